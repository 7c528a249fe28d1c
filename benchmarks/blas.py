"""Give MLX's CPU device the system OpenBLAS, as vllm-metal does for itself.

mlx-lm processes in the suite call ``preload_openblas()`` before importing MLX,
so mlx-lm and the plugin run float32 matmuls on the same BLAS.
"""

import ctypes
import os
import sys

OPENBLAS_PATHS = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libblas.so.3",
)


def preload_openblas() -> str | None:
    """Load OpenBLAS globally; returns its path, or None where it is absent."""
    if not sys.platform.startswith("linux"):
        return None
    if "mlx.core" in sys.modules:
        raise RuntimeError("preload_openblas() must run before MLX is imported")
    for path in OPENBLAS_PATHS:
        if os.path.exists(path):
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            return path
    return None
