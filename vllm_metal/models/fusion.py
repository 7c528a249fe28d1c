"""Projections that read the same input, fused into one matmul at load.

On an accelerator the host's cost of issuing a decode step limits its speed, and
a matmul is the dearest primitive to issue: 12-20 us on MLX's CUDA build against
1-5 us for most others (``benchmarks/issue_cost.py``). Attention's q, k and v
projections read the same input, as do an MLP's gate and up projections; one
matmul over their stacked weights and one split (views, no copies) replace three
and two. The output rows are the same dot products, so the results are those of
the separate projections up to the matmul kernel's summation order.

mlx-lm's model code stays as it is: each projection becomes a ``ProjectionPart``
that returns its slice of the fused product, computed once per input array (the
parts of one group are called with the same array object).
"""

import mlx.core as mx
import mlx.nn as nn

# Sibling projections of one module that read the same input, in output order.
GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
FUSED_NAMES = {GROUPS[0]: "qkv_fused", GROUPS[1]: "gate_up_fused"}


class FusedProjection(nn.Module):
    """One (possibly quantized) linear layer over several projections' stacked
    weights, split back into their outputs."""

    def __init__(self, layer: nn.Module, widths: list[int]):
        super().__init__()
        self.layer = layer
        # Plain attributes (a Module keeps arrays and lists as parameters).
        object.__setattr__(self, "_last", _LastProduct())
        object.__setattr__(self, "_split_at",
                           [sum(widths[: i + 1]) for i in range(len(widths) - 1)])

    def part(self, index: int, x: mx.array) -> mx.array:
        last = self._last
        if x is not last.input or index in last.taken:
            last.input, last.taken = x, set()
            last.outputs = mx.split(self.layer(x), self._split_at, axis=-1)
        out = last.outputs[index]
        last.taken.add(index)
        if len(last.taken) == len(last.outputs):
            last.input = last.outputs = None  # hold no step's arrays between steps
        return out


class _LastProduct:
    """The last input a group was called with, its parts, and which were taken."""

    def __init__(self):
        self.input = None
        self.outputs = None
        self.taken = set()


class ProjectionPart(nn.Module):
    """Stands where one of the fused projections stood; owns no weights."""

    def __init__(self, fused: FusedProjection, index: int):
        super().__init__()
        # A plain attribute, not a child module: the weights belong to the parent once.
        object.__setattr__(self, "_fused", fused)
        self.index = index

    def __call__(self, x: mx.array) -> mx.array:
        return self._fused.part(self.index, x)


def fuse_projections(model: nn.Module) -> int:
    """Fuse every group of sibling projections that can be; returns how many groups."""
    fused = 0
    for _, module in model.named_modules():
        for group in GROUPS:
            layers = [module.get(name) if isinstance(module, dict) else None for name in group]
            stacked = _stack(layers)
            if stacked is None:
                continue
            widths = [layer.weight.shape[0] for layer in layers]
            fusion = FusedProjection(stacked, widths)
            setattr(module, FUSED_NAMES[group], fusion)
            for index, name in enumerate(group):
                setattr(module, name, ProjectionPart(fusion, index))
            fused += 1
    return fused


def _stack(layers: list) -> nn.Module | None:
    """One layer with the rows of all of ``layers``, or None where they differ in kind,
    input width, bias or quantization."""
    first = layers[0]
    if first is None or any(type(layer) is not type(first) for layer in layers):
        return None
    if type(first) not in (nn.Linear, nn.QuantizedLinear):
        return None
    has_bias = "bias" in first
    if any(("bias" in layer) != has_bias for layer in layers):
        return None
    if any(layer.weight.shape[1:] != first.weight.shape[1:] for layer in layers):
        return None
    rows = lambda key: mx.concatenate([layer[key] for layer in layers], axis=0)  # noqa: E731
    if isinstance(first, nn.QuantizedLinear):
        config = (first.group_size, first.bits, first.mode, "biases" in first)
        if any((layer.group_size, layer.bits, layer.mode, "biases" in layer) != config
               for layer in layers):
            return None
        out = nn.QuantizedLinear.__new__(nn.QuantizedLinear)
        nn.Module.__init__(out)
        out.group_size, out.bits, out.mode = first.group_size, first.bits, first.mode
        out.weight, out.scales = rows("weight"), rows("scales")
        if "biases" in first:
            out.biases = rows("biases")
    else:
        out = nn.Linear(1, 1, bias=False)
        out.weight = rows("weight")
    if has_bias:
        out.bias = rows("bias")
    out.freeze()
    return out
