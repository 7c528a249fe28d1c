"""Per-step overhead of the plugin at batch 1, from its VLLM_METAL_DEBUG=1 log.

The model runner logs, per step, ``prepare``, ``forward issue`` (building the
MLX graph; on the CPU device MLX also starts computing here), ``forward wait``
(until the logits are ready) and ``sample`` times. The step period is the
client-side inter-token latency of the same run. So:

    forward  = median(forward issue + forward wait)   over one-token decode steps
    overhead = 1 - forward / median inter-token latency

covers everything outside the MLX forward: input preparation, sampling,
vLLM's scheduler, and the engine-core-to-client hand-off.
"""

import re
import statistics
from pathlib import Path

STEP_LINE = re.compile(
    r"step: (?P<reqs>\d+) reqs, (?P<tokens>\d+) tokens \| prepare (?P<prepare>[\d.]+) ms, "
    r"forward issue (?P<issue>[\d.]+) ms, forward wait (?P<wait>[\d.]+) ms, "
    r"sample (?P<sample>[\d.]+) ms"
)


def decode_steps(log_text: str) -> list[dict[str, float]]:
    """The one-request, one-token steps in a debug log, as floats (ms)."""
    steps = []
    for match in STEP_LINE.finditer(log_text):
        if match["reqs"] == "1" and match["tokens"] == "1":
            steps.append({k: float(match[k]) for k in ("prepare", "issue", "wait", "sample")})
    return steps


def step_breakdown(log_path: Path, itl_p50_ms: float, last_steps: int) -> dict | None:
    """Median phase times of the last ``last_steps`` decode steps, and the overhead share."""
    steps = decode_steps(log_path.read_text(errors="replace"))[-last_steps:]
    if not steps:
        return None
    median = {k: statistics.median(s[k] for s in steps) for k in steps[0]}
    forward = statistics.median(s["issue"] + s["wait"] for s in steps)
    return {
        "steps": len(steps),
        "prepare_ms": median["prepare"],
        "forward_issue_ms": median["issue"],
        "forward_wait_ms": median["wait"],
        "forward_ms": forward,
        "sample_ms": median["sample"],
        "step_ms": itl_p50_ms,
        "outside_runner_ms": itl_p50_ms - forward - median["prepare"] - median["sample"],
        "overhead_share": max(0.0, 1.0 - forward / itl_p50_ms),
    }
