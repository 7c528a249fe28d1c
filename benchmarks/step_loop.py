"""A decode step's time with no engine around it: mlx-lm's step and the plugin's
compiled step, each issued in a tight loop the way mlx-lm's generate loop does
(step n+1 issued before step n's tokens are read), bracketed A B A B A.

Against the engine's own step time (``benchmarks.gpu``) this splits a gap to
mlx-lm in two: what the step's kernels cost (this loop) and what the engine
adds around them (scheduling, inputs, output handling). The host's share of
each step is reported too: the time to build and issue it, which the device
hides while the host stays ahead of it.

``--variants NAME:SETTING=VALUE[,SETTING=VALUE]`` adds the compiled step traced
with other settings (those read when a step is traced: the kernels' choices,
``VLLM_METAL_GEMV_SPLIT_UNROLL``, ``VLLM_METAL_ATTENTION_WARPS``) to each round,
timed by the wall clock, where a profiler's activity records distort short kernels.

    python -m benchmarks.step_loop MODEL_DIR [--batch 1 8] [--steps 100] [--out DIR]
        [--variants rows-2:VLLM_METAL_GEMV_SPLIT_UNROLL=4-4-2]
"""

import statistics
import time

from benchmarks.device_profile import batch_parser, run_batches
from benchmarks.host_cost import decode_steps

PLUGIN = "plugin_compiled"


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


def measure(model_dir: str, batch: int, steps: int,
            variants: dict[str, dict[str, str]] | None = None) -> dict:
    # Room in the pools for the warm-up and both of each plugin step's rounds.
    step_of, facts = decode_steps(model_dir, batch, steps + 8, variants=variants)
    plugins = [PLUGIN, *(f"{PLUGIN}:{name}" for name in variants or {})]
    pipelined = {"mlx_lm": True, **{name: facts["writes_in_place"] for name in plugins}}
    for name in pipelined:
        for _ in range(3):
            step_of[name]().tolist()  # traced and warm
    runs = {name: [] for name in pipelined}
    for name in ["mlx_lm", *plugins, "mlx_lm", *plugins, "mlx_lm"]:
        runs[name].append(loop_ms(step_of[name], steps, pipelined[name]))
    result = {"batch": batch, **facts, "steps": steps, "variants": variants or {}}
    for name, rows in runs.items():
        result[name] = {"step_ms": statistics.median(r["step_ms"] for r in rows),
                        "issue_ms": statistics.median(r["issue_ms"] for r in rows),
                        "runs_ms": [r["step_ms"] for r in rows]}
    result["ratio"] = round(result["mlx_lm"]["step_ms"] / result[PLUGIN]["step_ms"], 3)
    return result


def table(results: list[dict]) -> str:
    lines = ["| batch | step | step ms (runs) | host issue ms | mlx-lm step / this step |",
             "| --- | --- | --- | --- | --- |"]
    for r in results:
        for name in [key for key in r if key == "mlx_lm" or key.startswith(PLUGIN)]:
            runs = ", ".join(f"{ms:.3f}" for ms in r[name]["runs_ms"])
            speed = round(r["mlx_lm"]["step_ms"] / r[name]["step_ms"], 3)
            lines.append(f"| {r['batch']} | {name} | {r[name]['step_ms']:.3f} ({runs}) | "
                         f"{r[name]['issue_ms']:.3f} | {speed} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    args = batch_parser(__doc__, steps=100, variants=True).parse_args()
    variants = dict(args.variants)
    run_batches(args.batch, lambda batch: measure(args.model, batch, args.steps, variants),
                "step_loop", args.out, table)


if __name__ == "__main__":
    main()
