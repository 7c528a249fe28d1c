"""LoRA adapters: PEFT checkpoints (adapter_config.json + adapter_model.safetensors)
applied in MLX to the attention and MLP projections, several adapters in one batch.

Each targeted projection is wrapped once at load (``LoRALinear``) with stacked
weights for ``max_loras + 1`` slots: slot 0 stays zero (requests without an
adapter), the others hold the adapters of the running batch, their rank padded
to ``max_lora_rank`` with zeros and the PEFT scaling folded into B. A forward
group hands every row its slot (``AdapterRows``); the projection adds
``(x @ A[slot].T) @ B[slot].T`` per row, and nothing when no row has an adapter.

Loaded adapters (up to ``max_cpu_loras``, least recently used evicted, pinned ones
kept) live in host arrays; a slot is filled when a batch needs the adapter.
vLLM's PEFTHelper reads and checks adapter_config.json, so ranks, scaling
(rsLoRA, rank_pattern, alpha_pattern) and refusals follow vLLM's own rules.
"""

import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

logger = logging.getLogger("vllm.metal")

# mlx-lm attribute names of the projections adapters may target (fused ones too).
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj",
                  "gate_proj", "up_proj", "down_proj", "gate_up_proj")
PEFT_PREFIX = "base_model.model."


class LoRAError(ValueError):
    pass


class AdapterRows:
    """The slot of each row of the forward being built (None: no adapter in it)."""

    def __init__(self):
        self.slots: mx.array | None = None


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Module, num_slots: int, max_rank: int, dtype, rows: AdapterRows):
        super().__init__()
        self.base = base
        out_features, in_features = linear_shape(base)
        self.lora_a = mx.zeros((num_slots, max_rank, in_features), dtype=dtype)
        self.lora_b = mx.zeros((num_slots, out_features, max_rank), dtype=dtype)
        self._rows = rows

    def __call__(self, x: mx.array) -> mx.array:
        out = self.base(x)
        slots = self._rows.slots
        if slots is None:
            return out
        # x [B, L, in] @ [B, in, r] @ [B, r, out]: each row with its own adapter.
        down = x @ self.lora_a[slots].swapaxes(-1, -2)
        return out + down @ self.lora_b[slots].swapaxes(-1, -2)


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(out, in) features of a float or MLX-quantized linear layer."""
    out_features, columns = module.weight.shape
    bits = getattr(module, "bits", None)
    return out_features, columns * 32 // bits if bits else columns


@dataclass
class Adapter:
    lora_id: int
    name: str
    # module path ("model.layers.0.self_attn.q_proj") -> (A [r, in], B x scaling [out, r])
    weights: dict[str, tuple[mx.array, mx.array]]


class Adapters:
    """What the worker's add_lora / remove_lora / list_loras / pin_lora act on,
    and the slots of each forward group."""

    def __init__(self, model: nn.Module, lora_config, max_position_embeddings: int, dtype):
        self.max_loras = lora_config.max_loras
        self.max_rank = lora_config.max_lora_rank
        self.max_loaded = max(lora_config.max_cpu_loras or self.max_loras, self.max_loras)
        self.lora_config = lora_config
        self.max_position_embeddings = max_position_embeddings
        self.dtype = dtype
        self.rows = AdapterRows()
        self.targets = tuple(lora_config.target_modules or TARGET_MODULES)
        self.modules = wrap_projections(model, self.targets, self.max_loras + 1, self.max_rank, dtype,
                                        self.rows)
        self.loaded: OrderedDict[int, Adapter] = OrderedDict()
        self.pinned: set[int] = set()
        self.slot_of: dict[int, int] = {}  # lora id -> slot (1..max_loras)
        logger.info("LoRA: %d projections take adapters (up to %d per batch, rank <= %d)",
                    len(self.modules), self.max_loras, self.max_rank)

    # ---- the worker's calls ------------------------------------------------
    def add(self, lora_request, keep: frozenset[int] = frozenset()) -> bool:
        """Load the adapter (again, with new weights, under ``load_inplace``); ``keep``:
        ids the forward being built needs, never evicted to make room."""
        lora_id = lora_request.lora_int_id
        if lora_id in self.loaded and not getattr(lora_request, "load_inplace", False):
            self.loaded.move_to_end(lora_id)
            return False
        self.loaded[lora_id] = self._read(lora_request)
        self.loaded.move_to_end(lora_id)
        self._free_slot(lora_id)  # a reload refills its slot when next used
        self._evict_beyond(self.max_loaded, keep | {lora_id})
        return True

    def remove(self, lora_id: int) -> bool:
        if lora_id not in self.loaded:
            return False
        del self.loaded[lora_id]
        self.pinned.discard(lora_id)
        self._free_slot(lora_id)
        return True

    def ids(self) -> set[int]:
        return set(self.loaded)

    def pin(self, lora_id: int) -> bool:
        if lora_id not in self.loaded:
            raise LoRAError(f"LoRA {lora_id} is not loaded, so it cannot be pinned")
        self.pinned.add(lora_id)
        return True

    # ---- a forward group ---------------------------------------------------
    def activate(self, lora_ids: list[int], requests: dict) -> None:
        """Give each row of the next forward its adapter's slot (``lora_ids``: vLLM's
        lora_int_id per row, 0 for none; ``requests``: id -> LoRARequest)."""
        wanted = {i for i in lora_ids if i}
        if not wanted:
            self.rows.slots = None
            return
        if len(wanted) > self.max_loras:
            raise LoRAError(f"{len(wanted)} adapters in one batch, more than max_loras "
                            f"{self.max_loras}")
        for lora_id in wanted:
            if lora_id not in self.loaded:
                self.add(requests[lora_id], keep=frozenset(wanted))
            self.loaded.move_to_end(lora_id)
            if lora_id not in self.slot_of:
                self._fill_slot(lora_id, keep=wanted)
        self.rows.slots = mx.array([self.slot_of[i] if i else 0 for i in lora_ids])

    # ---- inside ------------------------------------------------------------
    def _read(self, lora_request) -> Adapter:
        path = Path(lora_request.lora_path)
        where = f"LoRA adapter {lora_request.lora_name!r} ({path})"
        if not path.is_dir():
            raise LoRAError(f"{where}: not a local directory (adapters are read from disk, "
                            "never downloaded)")
        weights_file = path / "adapter_model.safetensors"
        if not weights_file.exists():
            raise LoRAError(f"{where}: no adapter_model.safetensors (PEFT's safetensors "
                            "format is read; convert .bin adapters with PEFT first)")
        peft = read_peft_config(path, self.max_position_embeddings, self.lora_config, where)
        tensors = mx.load(str(weights_file))
        weights = {}
        for name in sorted(tensors):
            pair = (name.replace(".lora_B.", ".lora_A.") if name.endswith(".lora_B.weight")
                    else name.replace(".lora_A.", ".lora_B."))
            if not name.endswith((".lora_A.weight", ".lora_B.weight")) or pair not in tensors:
                raise LoRAError(f"{where}: tensor {name} is not half of a LoRA A/B pair")
            if name.endswith(".lora_B.weight"):
                continue
            module = name.removeprefix(PEFT_PREFIX).removesuffix(".lora_A.weight")
            if module not in self.modules:
                raise LoRAError(f"{where}: adapts {module}, which takes no adapter here "
                                f"(only the attention and dense MLP projections "
                                f"{', '.join(self.targets)} do)")
            a = tensors[name]
            b = tensors[name.replace(".lora_A.", ".lora_B.")]
            rank, scaling = peft.get_rank_and_scaling(module)
            out_features, in_features = linear_shape(self.modules[module].base)
            if a.shape != (rank, in_features) or b.shape != (out_features, rank):
                raise LoRAError(f"{where}: {module} has A {a.shape} and B {b.shape}; this "
                                f"model needs ({rank}, {in_features}) and ({out_features}, {rank})")
            weights[module] = (a.astype(self.dtype), (b * scaling).astype(self.dtype))
        if not weights:
            raise LoRAError(f"{where}: holds no LoRA weights")
        mx.eval(weights)
        return Adapter(lora_request.lora_int_id, lora_request.lora_name, weights)

    def _fill_slot(self, lora_id: int, keep: set[int]) -> None:
        used = set(self.slot_of.values())
        free = [s for s in range(1, self.max_loras + 1) if s not in used]
        if not free:
            victim = next(i for i in self.slot_of if i not in keep)
            free = [self.slot_of.pop(victim)]
        slot = free[0]
        adapter = self.loaded[lora_id]
        for path, module in self.modules.items():
            a = mx.zeros(module.lora_a.shape[1:], self.dtype)
            b = mx.zeros(module.lora_b.shape[1:], self.dtype)
            if path in adapter.weights:
                wa, wb = adapter.weights[path]
                a[: wa.shape[0]] = wa
                b[:, : wb.shape[1]] = wb
            module.lora_a[slot] = a
            module.lora_b[slot] = b
        mx.eval([m.parameters() for m in self.modules.values()])
        self.slot_of[lora_id] = slot

    def _free_slot(self, lora_id: int) -> None:
        self.slot_of.pop(lora_id, None)

    def _evict_beyond(self, limit: int, keep: set[int]) -> None:
        """Drop least recently used adapters down to ``limit``, never pinned ones or
        ``keep``; with too few others, more stay loaded until they can go."""
        for lora_id in list(self.loaded):
            if len(self.loaded) <= limit:
                return
            if lora_id not in self.pinned and lora_id not in keep:
                del self.loaded[lora_id]
                self._free_slot(lora_id)


def wrap_projections(model: nn.Module, targets: tuple[str, ...], num_slots: int, max_rank: int,
                     dtype, rows: AdapterRows) -> dict[str, LoRALinear]:
    """Wrap every decoder layer's attention and dense-MLP projection named in
    ``targets``; returns them by the module path PEFT names them with."""
    wrapped = {}
    for index, layer in enumerate(model.model.layers):
        for block_name in ("self_attn", "mlp"):
            block = getattr(layer, block_name, None)
            if block is None:
                continue
            for name in targets:
                base = getattr(block, name, None)
                if isinstance(base, (nn.Linear, nn.QuantizedLinear)):
                    module = LoRALinear(base, num_slots, max_rank, dtype, rows)
                    setattr(block, name, module)
                    wrapped[f"model.layers.{index}.{block_name}.{name}"] = module
    return wrapped


def read_peft_config(path: Path, max_position_embeddings: int, lora_config, where: str):
    """vLLM's reading and checks of adapter_config.json (its PEFTHelper)."""
    from vllm.lora.peft_helper import PEFTHelper

    try:
        peft = PEFTHelper.from_local_dir(str(path), max_position_embeddings)
        peft.validate_legal(lora_config)
    except (OSError, ValueError, TypeError) as error:
        raise LoRAError(f"{where}: {error}") from error
    return peft
