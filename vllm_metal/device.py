"""Choosing MLX's device, and giving its CPU device a fast BLAS.

MLX's Linux CPU wheel links a slow reference BLAS for float32 matmuls; the
system OpenBLAS, loaded globally before MLX is first imported, replaces it.
"""

import ctypes
import logging
import os
import sys

from vllm_metal import envs

logger = logging.getLogger("vllm.metal")

OPENBLAS_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libblas.so.3",
)
_blas_loaded: str | None = None


def preload_blas() -> str | None:
    """Load a fast BLAS globally; must run before ``import mlx``."""
    global _blas_loaded
    if _blas_loaded is not None or not sys.platform.startswith("linux"):
        return _blas_loaded
    choice = envs.VLLM_METAL_BLAS
    paths = OPENBLAS_CANDIDATES if choice == "auto" else (choice,)
    for path in paths:
        if os.path.exists(path):
            if "mlx.core" in sys.modules:
                logger.warning("MLX was imported before %s could be loaded; float32 on CPU stays slow", path)
                return None
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            _blas_loaded = path
            return path
    if choice != "auto":
        raise envs.SettingError(f"VLLM_METAL_BLAS={choice!r}: no such file")
    return None


# glibc mallopt parameters.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_KEEP_HEAP_BYTES = 1 << 30


def keep_heap_between_steps() -> bool:
    """Stop glibc from returning the heap to the kernel after every step and from
    serving large blocks by fresh mmaps: on MLX's CPU device each step's
    temporaries otherwise cost page faults on every allocation (measured: a
    batch-16 forward took twice as long). Linux glibc only; a no-op elsewhere."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, _KEEP_HEAP_BYTES)
        ok &= libc.mallopt(_M_TRIM_THRESHOLD, 2 * _KEEP_HEAP_BYTES)
        return bool(ok)
    except (OSError, AttributeError):
        return False


def mlx_available() -> bool:
    """Whether MLX is installed, without importing it: the process that asks may
    fork the engine later, and MLX must not be initialised across a fork."""
    import importlib.util

    try:
        return importlib.util.find_spec("mlx.core") is not None
    except (ImportError, ValueError):
        return False


def select_device():
    """Set and return MLX's default device from VLLM_MLX_DEVICE."""
    preload_blas()
    import mlx.core as mx

    wanted = envs.VLLM_MLX_DEVICE
    if wanted == "gpu" and not mx.is_available(mx.gpu):
        logger.info("VLLM_MLX_DEVICE=gpu but MLX has no GPU here; using the MLX CPU device")
        wanted = "cpu"
    device = mx.gpu if wanted == "gpu" else mx.cpu
    mx.set_default_device(device)
    return mx.default_device()


def on_cuda() -> bool:
    """Whether MLX runs on its CUDA build's GPU (where the project's CUDA kernels run)."""
    import mlx.core as mx

    return mx.default_device() == mx.gpu and mx.cuda.is_available()


def cuda_feature(setting: str, choice: str) -> bool:
    """Whether a feature of MLX's CUDA build is on, from its setting's value: 0 off,
    auto where it can run, 1 on (off that build: startup stops)."""
    if choice == "0":
        return False
    cuda = on_cuda()
    if choice == "1" and not cuda:
        raise RuntimeError(f"{setting}=1 needs MLX's CUDA build on an NVIDIA GPU; set it to 0 "
                           "(or leave it out) here")
    return cuda


def describe() -> str:
    import mlx.core as mx

    device = mx.default_device()
    if device.type == mx.gpu:
        info = mx.device_info() if hasattr(mx, "device_info") else {}
        return f"MLX GPU ({info.get('device_name', 'gpu')})"
    return f"MLX CPU ({'OpenBLAS' if _blas_loaded else 'bundled BLAS'})"
