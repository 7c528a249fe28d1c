"""Every ``VLLM_METAL_*`` setting, in one table.

| variable | default | meaning |
| --- | --- | --- |
| VLLM_METAL_USE_MLX | 1 | 0 switches the plugin off; vLLM then picks its own platform |
| VLLM_MLX_DEVICE | gpu | gpu or cpu; gpu falls back to cpu (with a log line) where MLX has no GPU |
| VLLM_METAL_MEMORY_FRACTION | auto | share of the device's memory (Metal: the GPU's recommended working set; CUDA: the GPU's memory; CPU: the machine's) this engine may use for weights, KV cache and activations; auto: `--gpu-memory-utilization` (vLLM's default 0.92), the same setting; `--kv-cache-memory-bytes` overrides both (see Memory) |
| VLLM_METAL_BLOCK_SIZE | 16 | tokens per KV-cache block (vLLM's `--block-size` wins when given) |
| VLLM_METAL_DEBUG | 0 | 1 logs each step's batch composition and timings |
| VLLM_METAL_DEQUANTIZE | auto | auto, 1 or 0: dequantize quantized weights at load (auto: only on the CPU device, where MLX's quantized kernels are slow) |
| VLLM_METAL_BLAS | auto | auto or a path: the BLAS library MLX's CPU device uses for float32 (auto: the system OpenBLAS when present) |
| VLLM_METAL_DISTRIBUTED_BACKEND | ring | ring, jaccl or nccl: the mx.distributed backend for tensor/pipeline parallel collectives (ring: TCP; jaccl: RDMA over Thunderbolt; nccl: NVIDIA GPUs, MLX's CUDA build, one GPU per rank) |
| VLLM_METAL_CONNECT_TIMEOUT | 30 | seconds a rank waits to reach the coordinator (rank 0's --master-addr:--master-port) before giving up |
| VLLM_METAL_MAX_WAITING_REQUESTS | none | `vllm serve`: generation requests allowed to wait beyond the `--max-num-seqs` running ones; past that a request gets HTTP 429 at once (none: no bound) |
| VLLM_METAL_FUSE_PROJECTIONS | 1 | 1 fuses projections that read the same input (attention's q/k/v, an MLP's gate/up) into one matmul at load: fewer primitives for the host to issue per step; 0 keeps them apart (off anyway with LoRA, whose adapters attach to each projection) |
| VLLM_METAL_PAGED_ATTENTION_KERNEL | auto | auto, 1 or 0: decode attention as one custom kernel reading the paged pools (auto: on MLX's CUDA build, where MLX's fused attention takes no array mask); 0 gathers the context and runs MLX's attention |
| VLLM_METAL_PAGED_ATTENTION_KEY_PER_LANE | 0 | 1: the decode attention kernel scores 32 keys at a time per warp, one key per lane (more reads in flight), instead of one key at a time per warp; off by default until its GPU tests and a benchmark have passed |
| VLLM_METAL_KV_WRITE_IN_PLACE | auto | auto, 1 or 0: compiled decode steps write their keys and values into the pools' own buffers with a kernel and are issued while the step before still runs (a scatter must wait for it, or MLX copies the whole pool); auto: where the fused decode step (`VLLM_METAL_FUSED_DECODE_BLOCK`) runs, whose attention kernel does the write (measured ahead there); 1 also for the other layers' compiled steps on MLX's CUDA build (measured even to 13% behind on the 0.6B shape); 1 elsewhere is refused, and so is 1 with --enforce-eager, LoRA or TP/PP, which run no compiled steps |
| VLLM_METAL_FUSED_DECODE_BLOCK | auto | auto, 1 or 0: a compiled decode step runs each decoder layer of Llama, Mistral, Qwen2 and Qwen3 models (unquantized, one rank, no LoRA) in six kernels (norm and q/k/v projection; the whole attention with its KV write; output projection and residual; norm and gate/up projection; SwiGLU; down projection and residual) instead of about 25 primitives; auto: on MLX's CUDA build, for the layers it covers; 1 elsewhere, or with a model it does not cover, is refused; 0 keeps mlx-lm's layers |
| VLLM_METAL_GEMV_KERNEL | auto | auto, 1 or 0: linear layers called with at most 8 rows (decode steps) of a weight under 16 MiB as one custom matrix-vector kernel (larger weights, which set a model's step on the device, MLX's matmul reads faster: Llama-3-8B at batch 1, 198 against 166 tok/s); auto: on MLX's CUDA build, where a matmul costs the host four times a custom kernel to issue; 0 keeps MLX's matmul |
| VLLM_METAL_GEMV_TENSOR_CORES | auto | auto, 1 or 0: linear layers called with 9 to 32 rows (bf16, fp16) of a weight under 16 MiB as one custom tensor-core kernel with the norm, bias and residual folded in, where MLX's norm, matmul and add would run: its device time is behind the matmul's (`benchmarks/linear_kernels.py`), but a small model's step is set by the host's issue, which it cuts (Qwen3-0.6B at batch 32 on an H200: 3.5 against 6.3 ms); auto: on MLX's CUDA build on a GPU of compute capability 8.0 or later (1 on an older one is refused), where `VLLM_METAL_GEMV_KERNEL` is on; 0 keeps MLX's norm, matmul and add |
| VLLM_METAL_ATTENTION_WARPS | auto | auto or 1-32: warps a thread block of the fused decode step's attention kernel (`VLLM_METAL_FUSED_DECODE_BLOCK`) has, each taking 32 positions at a time; auto: 32 where a step has at most 64 blocks (batch x query heads), 16 above (`fused_decode.warps_for`) |
| VLLM_METAL_GEMV_SPLIT_UNROLL | auto | auto, SPLIT-UNROLL or SPLIT-UNROLL-ROWS (SPLIT 1, 2 or 4; UNROLL 1 to 8; ROWS 1, 2, 4 or 8), e.g. 4-2: the matrix-vector kernel's warps sharing a group of weight rows (each reading a share of the width), the loads of each row a lane keeps in flight and the weight rows in a group; auto: 4-4 for calls of 1 or 2 rows, 1-2 above, and as many weight rows as activation rows up to 4 (`gemv.vector_choice`, `gemv.rows_per_warp`) |
| VLLM_METAL_BATCH_PROMPTS | 1 | 1 runs prompt chunks of like length scheduled in one step as one padded forward (padding at most a quarter of the group's tokens and attention scores; `forward_groups.py`): the host issues one forward's primitives for many prompts; 0 runs each chunk alone |
| VLLM_METAL_RUNNER_THREAD | 1 | 1 runs a one-process engine's MLX work (model load, each step's forward and sampling) on a thread of its own, so that vLLM's scheduling and output handling overlap MLX's launch of the forward; 0 runs it on the engine's thread |
| VLLM_METAL_PEER_TIMEOUT | 3 | seconds a rank of a TP/PP engine waits for a silent peer's heartbeat (a stopped or hung process, a link down) before it stops the engine |

A bad value stops startup with a message naming the variable and what it accepts. Under tensor or
pipeline parallelism, VLLM_METAL_BLOCK_SIZE, VLLM_METAL_DISTRIBUTED_BACKEND, VLLM_METAL_FUSE_PROJECTIONS
and VLLM_METAL_BATCH_PROMPTS must be alike on every host: startup compares them and names the one
that differs.
"""

import os
from dataclasses import dataclass
from typing import Callable


class SettingError(ValueError):
    pass


@dataclass(frozen=True)
class Setting:
    name: str
    default: str
    parse: Callable[[str], object]
    help: str
    # Shapes what every rank of a TP/PP engine runs (its forwards, its weights'
    # layout): ranks that differ would run diverging collectives, so startup
    # compares it across ranks.
    ranks_agree: bool = False


def _flag(name: str) -> Callable[[str], bool]:
    def parse(raw: str) -> bool:
        if raw.strip().lower() in ("1", "true", "yes", "on"):
            return True
        if raw.strip().lower() in ("0", "false", "no", "off"):
            return False
        raise SettingError(f"{name}={raw!r} is not a flag: use 1 or 0")

    return parse


def _choice(name: str, choices: tuple[str, ...]) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in choices:
            raise SettingError(f"{name}={raw!r}: use one of {', '.join(choices)}")
        return value

    return parse


def _number(name: str, allowed: Callable[[float], bool], hint: str) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            value = float("nan")
        if not allowed(value):
            raise SettingError(f"{name}={raw!r}: use {hint}")
        return value

    return parse


def _fraction(name: str) -> Callable[[str], float]:
    return _number(name, lambda v: 0.0 < v <= 1.0, "a number in (0, 1], e.g. 0.7")


def _fraction_or_auto(name: str) -> Callable[[str], float | None]:
    fraction = _fraction(name)

    def parse(raw: str) -> float | None:
        if raw.strip().lower() == "auto":
            return None
        try:
            return fraction(raw)
        except SettingError:
            raise SettingError(f"{name}={raw!r}: use auto or a number in (0, 1], e.g. 0.7")

    return parse


def _block_size(name: str) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        if not raw.strip().isdigit() or int(raw) not in (8, 16, 32, 64, 128, 256):
            raise SettingError(f"{name}={raw!r}: use one of 8, 16, 32, 64, 128, 256")
        return int(raw)

    return parse


def _seconds(name: str) -> Callable[[str], float]:
    return _number(name, lambda v: v > 0, "a positive number of seconds")


def _count_or_none(name: str) -> Callable[[str], int | None]:
    def parse(raw: str) -> int | None:
        if raw.strip().lower() == "none":
            return None
        if not raw.strip().isdigit():
            raise SettingError(f"{name}={raw!r}: use a whole number of requests (0 or more) "
                               "or none")
        return int(raw)

    return parse


def _warps(name: str) -> Callable[[str], int | None]:
    def parse(raw: str) -> int | None:
        value = raw.strip().lower()
        if value == "auto":
            return None
        if not value.isdigit() or not 1 <= int(value) <= 32:
            raise SettingError(f"{name}={raw!r}: use auto or a whole number of warps, 1 to 32")
        return int(value)

    return parse


def _split_unroll(name: str) -> Callable[[str], tuple[int, int, int | None] | None]:
    def parse(raw: str) -> tuple[int, int, int | None] | None:
        value = raw.strip().lower()
        if value == "auto":
            return None
        parts = value.split("-")
        if (len(parts) in (2, 3) and all(p.isdigit() for p in parts)
                and int(parts[0]) in (1, 2, 4) and 1 <= int(parts[1]) <= 8
                and (len(parts) == 2 or int(parts[2]) in (1, 2, 4, 8))):
            return int(parts[0]), int(parts[1]), int(parts[2]) if len(parts) == 3 else None
        raise SettingError(f"{name}={raw!r}: use auto, SPLIT-UNROLL or SPLIT-UNROLL-ROWS: SPLIT 1, "
                           "2 or 4, UNROLL 1 to 8, ROWS 1, 2, 4 or 8; e.g. 4-2 or 4-4-2")

    return parse


def _text(name: str) -> Callable[[str], str]:
    return lambda raw: raw.strip()


_SETTINGS = [
    Setting("VLLM_METAL_USE_MLX", "1", _flag("VLLM_METAL_USE_MLX"), "plugin on/off"),
    Setting("VLLM_MLX_DEVICE", "gpu", _choice("VLLM_MLX_DEVICE", ("gpu", "cpu")), "MLX device"),
    Setting(
        "VLLM_METAL_MEMORY_FRACTION",
        "auto",
        _fraction_or_auto("VLLM_METAL_MEMORY_FRACTION"),
        "memory share for weights + KV cache + activations (None: --gpu-memory-utilization)",
    ),
    Setting("VLLM_METAL_BLOCK_SIZE", "16", _block_size("VLLM_METAL_BLOCK_SIZE"), "KV block size",
            ranks_agree=True),
    Setting("VLLM_METAL_DEBUG", "0", _flag("VLLM_METAL_DEBUG"), "debug logging"),
    Setting(
        "VLLM_METAL_DEQUANTIZE",
        "auto",
        _choice("VLLM_METAL_DEQUANTIZE", ("auto", "1", "0")),
        "dequantize weights at load",
    ),
    Setting("VLLM_METAL_BLAS", "auto", _text("VLLM_METAL_BLAS"), "BLAS library for MLX on CPU"),
    Setting(
        "VLLM_METAL_DISTRIBUTED_BACKEND",
        "ring",
        _choice("VLLM_METAL_DISTRIBUTED_BACKEND", ("ring", "jaccl", "nccl")),
        "mx.distributed backend",
        ranks_agree=True,
    ),
    Setting("VLLM_METAL_CONNECT_TIMEOUT", "30", _seconds("VLLM_METAL_CONNECT_TIMEOUT"),
            "coordinator connect timeout"),
    Setting("VLLM_METAL_MAX_WAITING_REQUESTS", "none",
            _count_or_none("VLLM_METAL_MAX_WAITING_REQUESTS"), "queue bound for vllm serve"),
    Setting("VLLM_METAL_FUSE_PROJECTIONS", "1", _flag("VLLM_METAL_FUSE_PROJECTIONS"),
            "fuse q/k/v and gate/up projections at load", ranks_agree=True),
    Setting("VLLM_METAL_PAGED_ATTENTION_KERNEL", "auto",
            _choice("VLLM_METAL_PAGED_ATTENTION_KERNEL", ("auto", "1", "0")),
            "custom paged decode attention kernel"),
    Setting("VLLM_METAL_PAGED_ATTENTION_KEY_PER_LANE", "0",
            _flag("VLLM_METAL_PAGED_ATTENTION_KEY_PER_LANE"),
            "paged attention kernel: a key per lane, 32 at a time per warp"),
    Setting("VLLM_METAL_KV_WRITE_IN_PLACE", "auto",
            _choice("VLLM_METAL_KV_WRITE_IN_PLACE", ("auto", "1", "0")),
            "decode steps write the KV pools in place (CUDA)"),
    Setting("VLLM_METAL_FUSED_DECODE_BLOCK", "auto",
            _choice("VLLM_METAL_FUSED_DECODE_BLOCK", ("auto", "1", "0")),
            "a decoder layer's decode step in six kernels (CUDA)"),
    Setting("VLLM_METAL_GEMV_KERNEL", "auto",
            _choice("VLLM_METAL_GEMV_KERNEL", ("auto", "1", "0")),
            "custom small-batch linear kernel"),
    Setting("VLLM_METAL_GEMV_TENSOR_CORES", "auto",
            _choice("VLLM_METAL_GEMV_TENSOR_CORES", ("auto", "1", "0")),
            "small-batch linear kernel on tensor cores, 9 to 32 rows (CUDA)"),
    Setting("VLLM_METAL_ATTENTION_WARPS", "auto", _warps("VLLM_METAL_ATTENTION_WARPS"),
            "fused decode attention: warps a block (CUDA)"),
    Setting("VLLM_METAL_GEMV_SPLIT_UNROLL", "auto",
            _split_unroll("VLLM_METAL_GEMV_SPLIT_UNROLL"),
            "matrix-vector kernel: warps splitting a row's width, loads in flight (CUDA)"),
    Setting("VLLM_METAL_BATCH_PROMPTS", "1", _flag("VLLM_METAL_BATCH_PROMPTS"),
            "prompt chunks of like length in one padded forward", ranks_agree=True),
    Setting("VLLM_METAL_RUNNER_THREAD", "1", _flag("VLLM_METAL_RUNNER_THREAD"),
            "MLX work on a thread of its own"),
    Setting("VLLM_METAL_PEER_TIMEOUT", "3", _seconds("VLLM_METAL_PEER_TIMEOUT"),
            "silent peer timeout"),
]
SETTINGS = {s.name: s for s in _SETTINGS}


def get(name: str):
    setting = SETTINGS[name]
    return setting.parse(os.environ.get(name, setting.default))


def rank_settings() -> dict[str, str]:
    """This process's values of the settings every rank must share, as parsed (a flag
    as 1 or 0), so that "true" and "1" agree."""
    values = {name: get(name) for name, s in SETTINGS.items() if s.ranks_agree}
    return {name: str(int(v)) if isinstance(v, bool) else str(v) for name, v in values.items()}


# The platform's device_control_env_var: vLLM's executors set it, the user may too (the
# GPUs a rank may use). A VLLM_METAL_* name, but read by vLLM and nccl.pin_gpu, not parsed here.
VISIBLE_DEVICES = "VLLM_METAL_VISIBLE_DEVICES"


def validate_all() -> None:
    """Parse every setting now, so a typo stops startup instead of a later step; a
    VLLM_METAL_* name that is no setting (misspelt, or retired) stops it too."""
    unknown = sorted(name for name in os.environ if name.startswith("VLLM_METAL_")
                     and name not in SETTINGS and name != VISIBLE_DEVICES)
    if unknown:
        raise SettingError(f"{', '.join(unknown)}: no such setting of vllm-metal (misspelt, or "
                           f"retired); unset it. The settings: {', '.join(SETTINGS)}")
    for name in SETTINGS:
        get(name)


def __getattr__(name: str):
    if name in SETTINGS:
        return get(name)
    raise AttributeError(name)
