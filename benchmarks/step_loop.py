"""A decode step's time with no engine around it: mlx-lm's step and the plugin's
compiled step, each issued in a tight loop the way mlx-lm's generate loop does
(step n+1 issued before step n's tokens are read), bracketed A B A B A.

Against the engine's own step time (``benchmarks.gpu``) this splits a gap to
mlx-lm in two: what the step's kernels cost (this loop) and what the engine
adds around them (scheduling, inputs, output handling). The host's share of
each step is reported too: the time to build and issue it, which the device
hides while the host stays ahead of it.

    python -m benchmarks.step_loop MODEL_DIR [--batch 1 8] [--steps 100] [--out DIR]
"""

import argparse
import json
import statistics
import time
from pathlib import Path

from benchmarks.host_cost import decode_steps

ROUNDS = ("mlx_lm", "plugin_compiled", "mlx_lm", "plugin_compiled", "mlx_lm")


def loop_ms(step, steps: int, pipelined: bool) -> dict:
    """Wall time a step over ``steps`` steps, and the host's median time to build
    and issue one."""
    import mlx.core as mx

    issue, last = [], None
    start = time.perf_counter()
    for _ in range(steps):
        began = time.perf_counter()
        out = step()
        mx.async_eval(out)
        issue.append(time.perf_counter() - began)
        if not pipelined:
            out.tolist()
        elif last is not None:
            last.tolist()
        last = out
    last.tolist()
    wall = time.perf_counter() - start
    return {"step_ms": round(1e3 * wall / steps, 3),
            "issue_ms": round(1e3 * statistics.median(issue), 3)}


def measure(model_dir: str, batch: int, steps: int) -> dict:
    # Room in the pools for the warm-up and both of the plugin's rounds.
    step_of, facts = decode_steps(model_dir, batch, steps + 8)
    pipelined = {"mlx_lm": True, "plugin_compiled": facts["writes_in_place"]}
    for name in pipelined:
        for _ in range(3):
            step_of[name]().tolist()  # traced and warm
    runs = {name: [] for name in pipelined}
    for name in ROUNDS:
        runs[name].append(loop_ms(step_of[name], steps, pipelined[name]))
    result = {"batch": batch, **facts, "steps": steps}
    for name, rows in runs.items():
        result[name] = {"step_ms": statistics.median(r["step_ms"] for r in rows),
                        "issue_ms": statistics.median(r["issue_ms"] for r in rows),
                        "runs_ms": [r["step_ms"] for r in rows]}
    result["ratio"] = round(result["mlx_lm"]["step_ms"] / result["plugin_compiled"]["step_ms"], 3)
    return result


def table(results: list[dict]) -> str:
    lines = ["| batch | mlx-lm step ms (runs) | its issue ms | plugin step ms (runs) | its issue ms "
             "| plugin speed / mlx-lm |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in results:
        m, p = r["mlx_lm"], r["plugin_compiled"]
        lines.append(f"| {r['batch']} | {m['step_ms']} ({', '.join(map(str, m['runs_ms']))}) | "
                     f"{m['issue_ms']} | {p['step_ms']} ({', '.join(map(str, p['runs_ms']))}) | "
                     f"{p['issue_ms']} | {r['ratio']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    from vllm_metal.device import select_device

    select_device()
    results = []
    for batch in args.batch:
        results.append(measure(args.model, batch, args.steps))
        print(json.dumps(results[-1]), flush=True)
    print(table(results))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "step_loop.json").write_text(json.dumps(results, indent=1))
        (args.out / "step_loop.md").write_text(table(results))


if __name__ == "__main__":
    main()
