"""Pipeline parallel: each stage keeps a contiguous run of decoder layers.

The mlx-lm model runs unchanged: its layer list keeps its length and every layer
keeps its index (layer-dependent behaviour such as Gemma 3's sliding-window
pattern stays right), but layers of other stages become pass-throughs. The first
layer of a later stage replaces its input with the hidden states received from
the previous stage; the last layer of an earlier stage sends its output on.
The embedding runs only on the first stage (and the last, for tied LM heads);
the norm and LM head only matter on the last.
"""

import mlx.core as mx
import mlx.nn as nn


def stage_layers(num_layers: int, pp_rank: int, pp_size: int) -> range:
    """Even split; the earlier stages take the remainder."""
    base, extra = divmod(num_layers, pp_size)
    start = pp_rank * base + min(pp_rank, extra)
    return range(start, start + base + (1 if pp_rank < extra else 0))


class PassThrough(nn.Module):
    """Another stage's layer: keeps the layer's plain attributes (the backbone may
    read flags such as ``use_sliding``), none of its weights."""

    def __init__(self, layer: nn.Module | None = None):
        super().__init__()
        if layer is not None:
            for key, value in vars(layer).items():
                if not key.startswith("_") and not isinstance(value, (mx.array, nn.Module)):
                    setattr(self, key, value)

    def __call__(self, x, *args, **kwargs):
        return x


class _Wrapped(nn.Module):
    """A stage-boundary layer that otherwise looks like the layer it wraps."""

    def __init__(self, layer: nn.Module, handoff: "StageHandoff"):
        super().__init__()
        self.layer = layer
        self._handoff = handoff

    def __getattr__(self, key):
        try:
            return super().__getattr__(key)
        except AttributeError:
            return getattr(super().__getattr__("layer"), key)


class ReceiveInput(_Wrapped):
    """First layer of a later stage: its input is the previous stage's output."""

    def __call__(self, x, *args, **kwargs):
        return self.layer(self._handoff.receive(x.shape, x.dtype), *args, **kwargs)


class SendOutput(_Wrapped):
    """Last layer of an earlier stage: its output goes to the next stage."""

    def __call__(self, x, *args, **kwargs):
        out = self.layer(x, *args, **kwargs)
        self._handoff.send(out)
        return out


class ZeroEmbedding(nn.Module):
    """A later stage's embedding: only the shape and dtype of its output are used."""

    def __init__(self, dims: int, dtype):
        super().__init__()
        self._dims = dims
        self._dtype = dtype

    def __call__(self, tokens: mx.array) -> mx.array:
        return mx.zeros((*tokens.shape, self._dims), dtype=self._dtype)


class StageHandoff:
    """Holds this step's pending send, so the runner can evaluate it."""

    def __init__(self, parallel):
        self.parallel = parallel
        self.pending: list[mx.array] = []

    def receive(self, shape, dtype) -> mx.array:
        return self.parallel.pp_recv(shape, dtype)

    def send(self, x: mx.array) -> None:
        self.pending.append(self.parallel.pp_send(x))

    def take_pending(self) -> list[mx.array]:
        pending, self.pending = self.pending, []
        return pending


def split_stages(model: nn.Module, pp_rank: int, pp_size: int, parallel, dtype,
                 hidden_size: int, tied_embeddings: bool) -> tuple[range, StageHandoff]:
    backbone = model.model
    layers = backbone.layers
    mine = stage_layers(len(layers), pp_rank, pp_size)
    handoff = StageHandoff(parallel)
    for index in range(len(layers)):
        if index not in mine:
            layers[index] = PassThrough(layers[index])
    if pp_rank > 0:
        layers[mine.start] = ReceiveInput(layers[mine.start], handoff)
        if not (tied_embeddings and pp_rank == pp_size - 1):
            backbone.embed_tokens = ZeroEmbedding(hidden_size, dtype)
    if pp_rank < pp_size - 1:
        layers[mine.stop - 1] = SendOutput(layers[mine.stop - 1], handoff)
        if "lm_head" in model:
            model.lm_head = PassThrough()
    return mine, handoff
