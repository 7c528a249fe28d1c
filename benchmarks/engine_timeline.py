"""When the device idles during the engine's own ``LLM.generate``: every kernel the
GPU ran during one generate (CUDA's activity records through PyTorch's profiler,
as ``device_profile``), laid against the call's wall time.

``device_profile`` times the compiled decode step in a loop of its own; this looks
at the engine around it: the device's idle time before the first kernel (request
intake, the first schedule), inside the run (gaps between steps, prompt steps)
and after the last kernel (outputs), the busy share of each tenth of the run,
and the longest gaps, each with its place in the run. The engine core runs in
this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so that one profiler sees
its kernels; the same generate without the profiler, and the engine as users get
it (its core in a process of its own), give the tok/s beside it.

    python -m benchmarks.engine_timeline MODEL_DIR [--batch 1 8] [--out DIR]
"""

import itertools
import json
import os
import tempfile
from pathlib import Path

from benchmarks.device_profile import DEVICE_CATEGORIES, batch_parser, write_results
from benchmarks.overhead import STEP_LINE, step_ms, step_parts

TENTHS = 10
TOP_GAPS = 8
FIRST_STEPS = 6


def busy_intervals(events: list[dict]) -> list[tuple[float, float]]:
    """The union of the device events' intervals (us), in order."""
    spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in events)
    merged: list[list[float]] = []
    for start, end in spans:
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(a, b) for a, b in merged]


def timeline(events: list[dict], begin: float, end: float) -> dict:
    """The device's busy and idle time within [begin, end] (us, the profiler's clock)."""
    device = [e for e in events if e.get("cat") in DEVICE_CATEGORIES and "dur" in e
              and begin <= e["ts"] <= end]
    if not device:
        return {"note": "no device activity recorded (no CUDA device, or CUPTI unavailable)"}
    busy = busy_intervals(device)
    first, last = busy[0][0], busy[-1][1]
    gaps = [(a_end, b_start - a_end) for (_, a_end), (b_start, _) in zip(busy, busy[1:])]
    tenth = (last - first) / TENTHS
    shares = []
    for i in range(TENTHS):
        lo, hi = first + i * tenth, first + (i + 1) * tenth
        covered = sum(max(0.0, min(b, hi) - max(a, lo)) for a, b in busy)
        shares.append(round(covered / tenth, 3) if tenth else 1.0)
    longest = sorted(gaps, key=lambda g: -g[1])[:TOP_GAPS]
    return {
        "wall_ms": round((end - begin) / 1e3, 2),
        "busy_ms": round(sum(b - a for a, b in busy) / 1e3, 2),
        "idle_before_ms": round((first - begin) / 1e3, 2),
        "idle_inside_ms": round(sum(g for _, g in gaps) / 1e3, 2),
        "idle_after_ms": round((end - last) / 1e3, 2),
        "kernels": len(device),
        "busy_share_by_tenth": shares,
        "longest_gaps": [{"at_ms": round((at - begin) / 1e3, 2), "ms": round(g / 1e3, 3)}
                         for at, g in longest],
    }


def step_pattern(log_text: str) -> dict:
    """The generate's steps from VLLM_METAL_DEBUG's lines: how many, and the first
    ones as requests/tokens/forwards with their host ms (how the requests arrived)."""
    steps = [(int(m["reqs"]), int(m["tokens"]), int(m["forwards"] or 1),
              round(step_ms(step_parts(m)), 2))
             for m in STEP_LINE.finditer(log_text)]
    return {"steps": len(steps),
            "first_steps": [f"{r}r/{t}t/{f}f {ms}ms" for r, t, f, ms in steps[:FIRST_STEPS]],
            "host_ms_sum": round(sum(s[3] for s in steps), 1)}


def profiled_generate(llm, batch_prompts, log: Path) -> tuple[float, dict]:
    """One generate under the profiler: its tok/s and its device timeline."""
    from torch.profiler import ProfilerActivity, record_function
    from torch.profiler import profile as torch_profile

    from benchmarks.gpu import plugin_tokens_per_s

    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp, "trace.json")
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            with record_function("engine_timeline.generate"):
                tok_s = plugin_tokens_per_s(llm, batch_prompts, log)
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text()).get("traceEvents", [])
    mark = next(e for e in events if e.get("name") == "engine_timeline.generate")
    return tok_s, timeline(events, mark["ts"], mark["ts"] + mark["dur"])


def ms_a_step(batch: int, tok_s: float) -> float:
    """A generate's wall ms per step (each step gives ``batch`` tokens) at ``tok_s``."""
    return 1e3 * batch / tok_s


def device_ms_a_step(result: dict) -> float | None:
    """The device's busy ms per step of the profiled generate (None without CUDA)."""
    busy = result["timeline"].get("busy_ms")
    return None if busy is None else busy / result["profiled_steps"]["steps"]


def measure(model_dir: str, batches: list[int], out: Path | None,
            engines: tuple[str, ...] = ("in_process", "default")) -> list[dict]:
    """Per batch size: the in-process engine's tok/s and its profiled generate, then
    the default engine's tok/s (one engine of each kind for all batches, one at a time;
    ``engines`` picks them)."""
    import gc

    import mlx.core as mx

    from benchmarks import gpu

    logs = Path(out or tempfile.mkdtemp())
    logs.mkdir(parents=True, exist_ok=True)
    results = {batch: {"batch": batch} for batch in batches}
    vocab = json.loads(Path(model_dir, "config.json").read_text())["vocab_size"]
    seeds = itertools.count(10**6)  # fresh prompts each run: no prefix-cache hits
    for name in engines:
        in_process = name == "in_process"
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if in_process else "1"
        log = logs / f"engine-timeline-{name}.log"
        llm = gpu.start_plugin(Path(model_dir), max(batches), {}, log)
        for batch in batches:
            result = results[batch]

            def batch_prompts():
                return gpu.prompts(batch, vocab, seed=next(seeds))

            for _ in range(2):  # warm: this batch's decode graphs traced
                gpu.plugin_tokens_per_s(llm, batch_prompts(), log)
            runs = [gpu.plugin_tokens_per_s(llm, batch_prompts(), log) for _ in range(2)]
            offset = log.stat().st_size
            runs.append(gpu.plugin_tokens_per_s(llm, batch_prompts(), log))
            result[f"{name}_tok_s"] = [round(r, 1) for r in runs]
            result[f"{name}_steps"] = step_pattern(gpu.log_after(log, offset))
            if in_process:
                offset = log.stat().st_size
                tok_s, result["timeline"] = profiled_generate(llm, batch_prompts(), log)
                result["profiled_tok_s"] = round(tok_s, 1)
                result["profiled_steps"] = step_pattern(gpu.log_after(log, offset))
            print(json.dumps(result), flush=True)
        gpu.stop(llm)
        del llm
        gc.collect()
        mx.clear_cache()
    os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    return [results[batch] for batch in batches]


def table(results: list[dict]) -> str:
    lines = ["| batch | tok/s in-process (profiled) | tok/s default | wall ms | busy ms | "
             "idle before / inside / after ms | busy share by tenth | longest gaps (at ms: ms) | "
             "steps (host ms summed), first steps |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        t, steps = r["timeline"], r["profiled_steps"]
        gaps = ", ".join(f"{g['at_ms']:.0f}: {g['ms']:.2f}" for g in t.get("longest_gaps", []))
        shares = " ".join(f"{s:.2f}" for s in t.get("busy_share_by_tenth", []))
        lines.append(
            f"| {r['batch']} | {r['in_process_tok_s']} ({r['profiled_tok_s']}) | "
            f"{r['default_tok_s']} | {t.get('wall_ms', '-')} | {t.get('busy_ms', '-')} | "
            f"{t.get('idle_before_ms', '-')} / {t.get('idle_inside_ms', '-')} / "
            f"{t.get('idle_after_ms', '-')} | {shares or t.get('note', '')} | {gaps} | "
            f"{steps['steps']} ({steps['host_ms_sum']}), {'; '.join(steps['first_steps'])} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    from vllm_metal.device import select_device

    args = batch_parser(__doc__, steps=None).parse_args()  # a generate's own steps
    select_device()
    results = measure(args.model, args.batch, args.out)
    print(table(results))
    write_results(args.out, "engine_timeline", results, table(results))


if __name__ == "__main__":
    main()
