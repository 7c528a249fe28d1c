"""Per-step overhead of the plugin at batch 1, from its VLLM_METAL_DEBUG=1 log.

The model runner logs, per step, ``prepare``, ``build`` (building the MLX
graph), ``forward issue`` (handing it to MLX; on the CPU device MLX also starts
computing here), then either ``forward wait`` and ``sample`` (a synchronous
step) or ``wait last`` (with asynchronous scheduling: waiting for the step
before, whose tokens this one needs). The step period is the client-side
inter-token latency of the same run. So, over one-token decode steps:

    issue    = median(build + forward issue)
    wait     = median(forward wait + wait last)
    forward  = median(build + forward issue + forward wait + wait last)
    overhead = 1 - forward / median inter-token latency

covers everything outside the MLX forward: input preparation, sampling,
vLLM's scheduler, and the engine-core-to-client hand-off.
"""

import re
import statistics
from pathlib import Path

STEP_LINE = re.compile(
    r"step(?: \((?:sync|async)\))?: (?P<reqs>\d+) reqs, (?P<tokens>\d+) tokens(?:, (?P<forwards>\d+) forwards?)? \| (?P<parts>[^\n]*)")
PART = re.compile(r"(?P<name>[a-z][a-z ]*?) (?P<ms>[\d.]+) ms")
# Parts a step line names that another part already holds: "forward issue" is the
# graph's building and its issue together.
INSIDE_OTHERS = ("build",)


def step_parts(match: re.Match) -> dict[str, float]:
    """A step line's parts (ms) by name."""
    return {m["name"]: float(m["ms"]) for m in PART.finditer(match["parts"])}


def step_ms(parts: dict[str, float]) -> float:
    """The runner's time for a step: its parts, each counted once."""
    return sum(ms for name, ms in parts.items() if name not in INSIDE_OTHERS)


def decode_steps(log_text: str) -> list[dict[str, float]]:
    """The one-request, one-token steps in a debug log: each part's ms (0 where
    the line has none), with ``issue`` = forward issue (the graph's building
    included) and ``wait`` = forward wait + wait last."""
    steps = []
    for match in STEP_LINE.finditer(log_text):
        if match["reqs"] != "1" or match["tokens"] != "1":
            continue
        parts = step_parts(match)
        steps.append({
            "prepare": parts.get("prepare", 0.0),
            "issue": parts.get("forward issue", 0.0),
            "wait": parts.get("forward wait", 0.0) + parts.get("wait last", 0.0),
            "sample": parts.get("sample", 0.0),
        })
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
