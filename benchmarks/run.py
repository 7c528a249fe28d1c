"""Run the side-by-side benchmark suite and write the results.

    .venv/bin/python -m benchmarks.run --scale small      # default, < 20 min on 2 CPU cores
    .venv/bin/python -m benchmarks.run --scale smoke      # CI check, tiny model
    .venv/bin/python -m benchmarks.run --scale full       # the issue's sizes (Mac / GPU)

Writes ``<out>/<scale>.md`` (tables), ``<out>/<scale>.json`` (every figure) and
``<out>/<scale>-throughput.png`` (throughput and ITL against concurrency).
"""

import argparse
import json
import os
import platform
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path

from benchmarks import bandwidth, models, offline, report, serving, targets
from benchmarks.engines import OFFLINE_ENGINES, VLLM_CPU, cpu_backend_problem
from benchmarks.procs import REPO
from benchmarks.scales import QUANTIZED, SCALES, single_run

DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=list(SCALES), default="small")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results folder")
    return parser.parse_args(argv)


def log(message: str) -> None:
    print(f"[benchmarks {time.strftime('%H:%M:%S')}] {message}", flush=True)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        names = [ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    return f"{cpu}, {os.cpu_count()} cores, {memory_gb:.0f} GB, {platform.system()} {platform.machine()}"


def run_offline(scale, model_dirs, vocab, logs) -> list[dict]:
    engines = OFFLINE_ENGINES
    rows = []
    if not scale.run_cpu_backend:
        engines = tuple(e for e in engines if e is not VLLM_CPU)
        rows += offline.unavailable_rows(VLLM_CPU, scale, f"not run at scale {scale.name}")
    elif problem := cpu_backend_problem():
        engines = tuple(e for e in engines if e is not VLLM_CPU)
        rows += offline.unavailable_rows(VLLM_CPU, scale, f"unavailable here: {problem}")
    for run in offline.plan(scale, engines):
        log(f"offline: {run.engine.key} {run.model} {run.dtype} {[w['kind'] for w in run.workloads]}")
        rows += offline.execute(run, scale, model_dirs[run.model], vocab[run.model], logs)
        for row in rows[-len(run.workloads):]:
            log(f"  {row['kind']}: {row['status'][:200]}")
    return offline.combine_rounds(rows)


def run_serving(scale, model_dirs, logs) -> list[dict]:
    rows = []
    for session in serving.sessions(scale):
        log(f"serving: {session.engine} (prefix caching {'on' if session.prefix_caching else 'off'})")
        rows += serving.run_session(session, scale, model_dirs[scale.concurrency_model],
                                    scale.concurrency_dtype, logs)
        for row in rows[-len(session.runs):]:
            log(f"  {row['kind']} {row.get('concurrency', '')}: {row['status'][:200]}")
    return rows


def ceilings(scale, model_dirs, bandwidth_gb_s) -> dict:
    limits = {}
    for variant in scale.single_dtypes:
        model, dtype = single_run(scale, variant)
        limits[variant] = bandwidth.decode_ceiling(
            model_dirs[model], dtype, scale.single_prompt_len, scale.single_new_tokens, bandwidth_gb_s,
            weights_as_stored=variant == QUANTIZED)
    return limits


def main(argv=None) -> int:
    args = parse_args(argv)
    scale = SCALES[args.scale]
    started = time.perf_counter()
    logs = args.out / f"logs-{scale.name}"
    logs.mkdir(parents=True, exist_ok=True)

    log("preparing models")
    names = {scale.concurrency_model} | {single_run(scale, v)[0] for v in scale.single_dtypes}
    model_dirs = {name: models.prepare(name) for name in names}
    vocab = {name: models.tokenizer_vocab_size(path) for name, path in model_dirs.items()}
    log("measuring memory bandwidth")
    results = {
        "scale": asdict(scale),
        "command": recorded_command(argv or sys.argv[1:]),
        "machine": machine(),
        "bandwidth": bandwidth.measure(scale.bandwidth_buffer_bytes),
        "models": {k: str(v) for k, v in model_dirs.items()},
    }
    results["ceilings"] = ceilings(scale, model_dirs, results["bandwidth"]["bandwidth_gb_s"])
    results["offline"] = run_offline(scale, model_dirs, vocab, logs)
    results["serving"] = run_serving(scale, model_dirs, logs)
    results["elapsed_s"] = time.perf_counter() - started
    verdicts = targets.evaluate(results, scale)
    results["targets"] = [asdict(t) for t in verdicts]
    write_outputs(results, scale, verdicts, args.out)
    log(f"done in {results['elapsed_s'] / 60:.1f} min: {args.out / (scale.name + '.md')}")
    return 0


def portable(text: str, out: Path) -> str:
    """Paths in the results as their readers find them: relative to the results
    folder, or to the project, not this machine's absolute ones."""
    for root in (out.resolve(), REPO):
        text = text.replace(f"{root}/", "")
    return text


def recorded_command(argv: list[str]) -> str:
    """The command line, without ``--out DIR`` (the results' own folder)."""
    kept, skip = [], False
    for arg in argv:
        if skip or arg == "--out":
            skip = not skip
            continue
        if not arg.startswith("--out="):
            kept.append(arg)
    return shlex.join([Path(sys.executable).name, "-m", "benchmarks.run", *kept])


def write_outputs(results, scale, verdicts, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    results = json.loads(portable(json.dumps(results, default=str), out))
    (out / f"{scale.name}.json").write_text(json.dumps(results, indent=1))
    (out / f"{scale.name}.md").write_text(report.markdown(results, scale, verdicts))
    report.plot(results, scale, out / f"{scale.name}-throughput.png")


if __name__ == "__main__":
    sys.exit(main())
