"""The engines compared, and how to tell whether vLLM's CPU backend can run here."""

import signal
import subprocess
from dataclasses import dataclass

from benchmarks.procs import PYTHON, REPO, engine_env


@dataclass(frozen=True)
class Engine:
    key: str
    label: str
    worker: str  # which runner in benchmarks.worker
    use_mlx: bool  # VLLM_METAL_USE_MLX for the process
    env: tuple[tuple[str, str], ...] = ()  # more environment for its processes


PLUGIN = Engine("vllm-metal", "vllm-metal (vLLM + MLX)", "vllm", True)
# The plugin on MLX's quantized kernels, as mlx-lm runs them (on the CPU device it
# dequantizes at load by default, where those kernels are slow).
PLUGIN_QUANTIZED = Engine("vllm-metal-4bit-kernels", "vllm-metal, 4-bit kernels", "vllm", True,
                          (("VLLM_METAL_DEQUANTIZE", "0"),))
MLX_LM = Engine("mlx-lm", "mlx-lm", "mlx-lm", True)
VLLM_CPU = Engine("vllm-cpu", "vLLM CPU backend", "vllm", False)
OFFLINE_ENGINES = (PLUGIN, MLX_LM, VLLM_CPU)


def cpu_backend_problem(timeout_s: float = 180) -> str | None:
    """Why vLLM's own CPU backend cannot run here, or None. Its compiled ops
    (``vllm._C``) are built for x86 CPUs with AVX-512 and may die with SIGILL."""
    try:
        proc = subprocess.run([PYTHON, "-c", "import vllm._C"], cwd=REPO, env=engine_env(False),
                              capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return f"importing vllm._C took over {timeout_s:.0f} s"
    if proc.returncode == -signal.SIGILL:
        return "vllm._C dies with 'Illegal instruction' (this CPU lacks an instruction set it was built for)"
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"]
        return f"importing vllm._C failed: {lines[-1][:200]}"
    return None
