"""Where a decode step's device time goes: every kernel the GPU ran during a
run of decode steps, mlx-lm's against the plugin's, from CUDA's own activity
records (CUPTI, through PyTorch's profiler, which sees every kernel of the
process, MLX's included).

For each kind of step (``host_cost.decode_steps``: mlx-lm's dense cache, the
plugin's compiled step) it reports per step: the host's wall time, the kernels'
summed time, the span from the first kernel's start to the last one's end,
the number of kernels, and the kernels that took the most time. A step whose
wall time exceeds its kernels' time by far is set by the host or by gaps
between kernels; one whose kernels' time is above mlx-lm's does more, or
slower, device work.

Steps are issued as each runs in its engine: mlx-lm's loop issues step n+1
before it reads step n's token; the plugin's compiled step does too where it
writes the pools in place (``VLLM_METAL_KV_WRITE_IN_PLACE``: by default where
its layers are fused, on CUDA), and otherwise waits for each step before the next.

    python -m benchmarks.device_profile MODEL_DIR [--batch 1 8] [--steps 20] [--out DIR]
        [--variants NAME:SETTING=VALUE[,SETTING=VALUE] ...]
"""

import argparse
import collections
import json
import re
import tempfile
import time
from pathlib import Path

from benchmarks.host_cost import decode_steps

DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


def run_steps(step, steps: int, pipelined: bool) -> None:
    import mlx.core as mx

    last = None
    for _ in range(steps):
        out = step()
        mx.async_eval(out)
        if not pipelined:
            out.tolist()
        elif last is not None:
            last.tolist()
        last = out
    last.tolist()


def kernel_name(name: str) -> str:
    """A kernel's name without its template arguments and parameters."""
    return re.split(r"[<(]", name, maxsplit=1)[0].strip()[:70] or name[:70]


def summarize(events: list[dict], steps: int, wall_s: float, top: int) -> dict:
    device = [e for e in events if e.get("cat") in DEVICE_CATEGORIES and "dur" in e]
    result = {"wall_ms": round(1e3 * wall_s / steps, 3), "events": len(device)}
    if not device:
        result["note"] = "no device activity recorded (no CUDA device, or CUPTI unavailable)"
        return result
    begin = min(e["ts"] for e in device)
    end = max(e["ts"] + e["dur"] for e in device)
    by_name = collections.defaultdict(lambda: [0.0, 0])
    for e in device:
        entry = by_name[kernel_name(e.get("name", "?"))]
        entry[0] += e["dur"]
        entry[1] += 1
    ranked = sorted(by_name.items(), key=lambda item: -item[1][0])
    result.update({
        "kernel_ms": round(sum(e["dur"] for e in device) / 1e3 / steps, 3),
        "span_ms": round((end - begin) / 1e3 / steps, 3),
        "kernels_per_step": round(len(device) / steps, 1),
        "top": [{"name": name, "ms": round(total / 1e3 / steps, 3),
                 "per_step": round(count / steps, 1)} for name, (total, count) in ranked[:top]],
    })
    return result


# Kernels that join a measured step's outputs (additions, copies), not what it measures.
JOINING = ("binary", "concat", "copy")


def kernels_ms(result: dict, launches: int) -> tuple[float, float | None]:
    """A ``profile`` result's time (ms) and kernels per launch, of its top kernels
    but those in ``JOINING``, over ``launches`` per step (nan, None without CUDA)."""
    if "top" not in result:
        return float("nan"), None
    kept = [k for k in result["top"] if not any(word in k["name"].lower() for word in JOINING)]
    return (sum(k["ms"] for k in kept) / launches,
            round(sum(k["per_step"] for k in kept) / launches, 2) if kept else None)


def write_results(out: Path | None, name: str, rows: list, markdown: str) -> None:
    """``name``.json and ``name``.md in ``out`` (nothing where it is None)."""
    if out is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(rows, indent=1))
    (out / f"{name}.md").write_text(markdown)


def profile(step, steps: int, pipelined: bool, top: int) -> dict:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for _ in range(3):
        step().tolist()  # traced and warm before the profiled steps
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp, "trace.json")
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            start = time.perf_counter()
            run_steps(step, steps, pipelined)
            wall = time.perf_counter() - start
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text()).get("traceEvents", [])
    return {"pipelined": pipelined, **summarize(events, steps, wall, top)}


def measure(model_dir: str, batch: int, steps: int, top: int,
            variants: dict[str, dict[str, str]] | None = None) -> dict:
    # Room in the pools for the warm-up and profiled steps of each kind.
    step_of, facts = decode_steps(model_dir, batch, steps + 8, variants=variants)
    result = {"batch": batch, **facts}
    for name in ("mlx_lm", "plugin_compiled", *(f"plugin_compiled:{v}" for v in variants or {})):
        pipelined = name == "mlx_lm" or facts["writes_in_place"]
        result[name] = profile(step_of[name], steps, pipelined, top)
    return result


def table(results: list[dict]) -> str:
    lines = ["| batch | step | issued | wall ms | kernels ms | span ms | kernels | top kernels (ms, count) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        for name in [key for key in r if key == "mlx_lm" or key.startswith("plugin_compiled")]:
            p = r[name]
            top = "; ".join(f"{k['name']} {k['ms']} x{k['per_step']}" for k in p.get("top", [])[:6])
            lines.append(f"| {r['batch']} | {name} | {'ahead' if p['pipelined'] else 'waits'} | "
                         f"{p['wall_ms']} | {p.get('kernel_ms', '-')} | {p.get('span_ms', '-')} | "
                         f"{p.get('kernels_per_step', '-')} | {top or p.get('note', '')} |")
    return "\n".join(lines) + "\n"


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    name, _, settings = text.partition(":")
    # A comma starts a new pair only before a SETTING=: values may hold commas.
    pairs = [item.split("=", 1) for item in re.split(r",(?=[A-Z][A-Z0-9_]*=)", settings) if item]
    if not name or not pairs or any(len(p) != 2 for p in pairs):
        raise argparse.ArgumentTypeError(f"{text!r}: use NAME:SETTING=VALUE[,SETTING=VALUE]")
    return name, dict(pairs)


def batch_parser(doc: str, steps: int | None, variants: bool = False) -> argparse.ArgumentParser:
    """The arguments of a benchmark that times decode steps of a model per batch size
    (``steps``: how many by default, None for a benchmark that takes no such number;
    ``variants``: and of the compiled step traced with other settings)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    if steps is not None:
        parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--out", type=Path, default=None)
    if variants:
        parser.add_argument("--variants", nargs="*", type=parse_variant, default=[],
                            help="NAME:SETTING=VALUE[,SETTING=VALUE]: the compiled step traced "
                                 "with these settings, beside the default")
    return parser


def run_batches(batches: list[int], measure_one, name: str, out: Path | None, to_table) -> None:
    """``measure_one(batch)`` for each batch size on MLX's chosen device; each result
    printed as JSON, then the table, written to ``out`` as NAME.json and NAME.md."""
    from vllm_metal.device import select_device

    select_device()
    results = []
    for batch in batches:
        results.append(measure_one(batch))
        print(json.dumps(results[-1]), flush=True)
    print(to_table(results))
    write_results(out, name, results, to_table(results))


def main() -> None:
    parser = batch_parser(__doc__, steps=20, variants=True)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    variants = dict(args.variants)
    run_batches(args.batch,
                lambda batch: measure(args.model, batch, args.steps, args.top, variants),
                "device_profile", args.out, table)


if __name__ == "__main__":
    main()
