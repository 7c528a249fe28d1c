"""How much memory the KV cache gets.

The engine may use a share of the device's memory for weights, KV cache and
activations: ``--gpu-memory-utilization`` (vLLM's default 0.92), or
``VLLM_METAL_MEMORY_FRACTION`` when that is set. The device's memory is

- Metal: the GPU's recommended working set (``mx.device_info()``); the cache is
  then wired (``mx.set_wired_limit``) so macOS keeps it resident;
- CUDA: the device's memory, and never more than is free on it now;
- CPU: the machine's memory.

Where the cache lives in the machine's memory (Metal's unified memory, CPU) it
also gets no more than what is available now (after the weights, the engine's
other processes and whatever else runs) less a reserve of ``HOST_RESERVE_SHARE``
of the machine's memory. Measured on a 2-core, 24 GiB Linux VM: a 21.5 GB cache
leaving 0.1-1.1 GB available decoded at 6.7-8.2 tokens/s against 27-34 with
256 MB, because the kernel, with no swap, evicted and re-read the page cache
(the code of every running program) 100,000-590,000 pages per 128 tokens; an
18 GB cache leaving 4.5 GB available decoded as fast as 256 MB.

On the CPU device the cache is also capped at what ``max_num_seqs`` requests of
``max_model_len`` tokens can fill, and at ``CPU_KV_CACHE_CAP_BYTES``: a decode
step reads every live token's keys and values, so 4 GiB of live context already
costs about a third of a second a step at a CPU's memory bandwidth, and MLX's
CPU device writes every page of the cache at start-up (1-2.5 s per GB there).

Ranks of one host split every limit. Too little memory for one request of
``max_model_len`` stops start-up, before the cache is allocated, with a message
naming the settings that change it.
"""

import logging
from dataclasses import dataclass

import psutil

from vllm_metal import envs

logger = logging.getLogger("vllm.metal")

GiB = 1024**3
# Room kept free for activations and temporaries of a forward pass.
ACTIVATION_RESERVE_BYTES = 512 * 1024**2
# Share of the machine's memory the KV cache leaves available to everything else.
HOST_RESERVE_SHARE = 0.35
CPU_KV_CACHE_CAP_BYTES = 4 * GiB

SETTINGS_HINT = (
    "Lower --max-model-len, pass --kv-cache-memory-bytes, raise --gpu-memory-utilization "
    "(or VLLM_METAL_MEMORY_FRACTION), free memory, or use a smaller (or quantized) model."
)


class KVCacheMemoryError(RuntimeError):
    pass


@dataclass(frozen=True)
class MemoryView:
    """The memory figures the budget is computed from, read once."""

    device: str  # "metal", "cuda" or "cpu"
    device_total: int  # Metal: recommended working set; CUDA: device memory; CPU: machine memory
    device_free: int | None  # CUDA: free on the device now; None where memory is the machine's
    host_total: int
    host_available: int

    @property
    def unified(self) -> bool:
        return self.device != "cuda"


@dataclass(frozen=True)
class Demand:
    weights: int  # this rank's weights, already loaded
    block_bytes: int  # one block of this rank's layers
    blocks_per_request: int  # blocks one request of max_model_len needs
    max_num_seqs: int
    ranks_on_host: int = 1

    @property
    def minimum(self) -> int:
        """One full-length request, plus vLLM's null block."""
        return (self.blocks_per_request + 1) * self.block_bytes


@dataclass(frozen=True)
class Budget:
    nbytes: int
    limited_by: str


def memory_fraction(gpu_memory_utilization: float, vllm_default: float) -> float:
    """VLLM_METAL_MEMORY_FRACTION when set, else --gpu-memory-utilization; both
    set to different values is refused rather than one silently winning."""
    env = envs.VLLM_METAL_MEMORY_FRACTION
    if env is None:
        return gpu_memory_utilization
    if gpu_memory_utilization not in (vllm_default, env):
        raise KVCacheMemoryError(
            f"--gpu-memory-utilization={gpu_memory_utilization} and "
            f"VLLM_METAL_MEMORY_FRACTION={env} disagree: they are the same setting; give one."
        )
    return env


def kv_cache_limits(view: MemoryView, demand: Demand, fraction: float) -> dict[str, int]:
    """Each limit on this rank's KV cache, in bytes, by what sets it."""
    ranks = demand.ranks_on_host
    limits = {
        f"{fraction:.2f} of the device's {view.device_total / 1e9:.1f} GB "
        "(--gpu-memory-utilization / VLLM_METAL_MEMORY_FRACTION), less weights":
            int(view.device_total * fraction) // ranks - demand.weights - ACTIVATION_RESERVE_BYTES,
    }
    if view.device_free is not None:
        limits[f"the device's free memory ({view.device_free / 1e9:.1f} GB)"] = (
            view.device_free // ranks - ACTIVATION_RESERVE_BYTES)
    if view.unified:
        reserve = int(view.host_total * HOST_RESERVE_SHARE)
        limits[f"the memory available now ({view.host_available / 1e9:.1f} GB) less "
               f"{HOST_RESERVE_SHARE:.0%} of the machine's {view.host_total / 1e9:.1f} GB"] = (
            (view.host_available - reserve) // ranks - ACTIVATION_RESERVE_BYTES)
    if view.device == "cpu":
        limits["what max_num_seqs requests of max_model_len tokens fill"] = (
            (demand.max_num_seqs * demand.blocks_per_request + 1) * demand.block_bytes)
        limits[f"the CPU device's cap of {CPU_KV_CACHE_CAP_BYTES / GiB:.0f} GiB"] = (
            CPU_KV_CACHE_CAP_BYTES // ranks)
    return limits


def kv_cache_budget(view: MemoryView, demand: Demand, fraction: float) -> Budget:
    limits = kv_cache_limits(view, demand, fraction)
    limited_by = min(limits, key=limits.get)
    budget = Budget(max(limits[limited_by], 0), limited_by)
    if budget.nbytes < demand.minimum:
        raise KVCacheMemoryError(
            f"Too little memory for one request of max_model_len: it needs "
            f"{demand.minimum / 1e9:.2f} GB of KV cache, and {limited_by} leaves "
            f"{budget.nbytes / 1e9:.2f} GB. {SETTINGS_HINT}"
        )
    return budget


def check_explicit_size(view: MemoryView, demand: Demand, nbytes: int) -> None:
    """--kv-cache-memory-bytes is taken as given, but not past the memory there is
    (the kernel would kill the engine) nor below one full-length request."""
    free = view.host_available if view.unified else view.device_free
    if free is not None and nbytes > free // demand.ranks_on_host - ACTIVATION_RESERVE_BYTES:
        raise KVCacheMemoryError(
            f"--kv-cache-memory-bytes={nbytes} ({nbytes / 1e9:.2f} GB) is more than the "
            f"{free / 1e9:.2f} GB available now (less {ACTIVATION_RESERVE_BYTES >> 20} MiB for "
            "activations, per rank). Pass a smaller size, or leave it out to size the cache "
            "from the memory there is."
        )
    if nbytes < demand.minimum:
        raise KVCacheMemoryError(
            f"--kv-cache-memory-bytes={nbytes} ({nbytes / 1e9:.2f} GB) is less than one request "
            f"of max_model_len needs ({demand.minimum / 1e9:.2f} GB). {SETTINGS_HINT}"
        )


def read_memory_view() -> MemoryView:
    """The figures for MLX's default device, now."""
    import mlx.core as mx

    host = psutil.virtual_memory()
    if mx.default_device().type != mx.gpu:
        return MemoryView("cpu", host.total, None, host.total, host.available)
    info = mx.device_info()
    if "max_recommended_working_set_size" in info:
        return MemoryView("metal", int(info["max_recommended_working_set_size"]), None,
                          host.total, host.available)
    total = int(info.get("total_memory") or info["memory_size"])
    # Without NVML's figure, count only MLX's own allocations as used.
    free = int(info.get("free_memory", total - mx.get_active_memory()))
    return MemoryView("cuda", total, free, host.total, host.available)


def keep_resident(view: MemoryView, nbytes: int) -> None:
    """Metal: wire the weights and cache so macOS does not page them out."""
    if view.device != "metal":
        return
    import mlx.core as mx

    mx.set_wired_limit(min(nbytes, view.device_total))
