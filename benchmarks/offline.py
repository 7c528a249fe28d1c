"""Offline workloads: single-stream decode, batch throughput and (mlx-lm only)
the serving workload's MLX forward ceiling; one worker process per engine,
model and dtype."""

import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks import overhead
from benchmarks.contention import ForeignCpu, share_of_machine
from benchmarks.engines import MLX_LM, PLUGIN, PLUGIN_QUANTIZED, Engine
from benchmarks.procs import WorkerFailed, engine_env, run_worker
from benchmarks.prompts import batch_prompts, random_prompt
from benchmarks.scales import QUANTIZED, Scale, single_run


@dataclass
class WorkerRun:
    engine: Engine
    model: str  # name in benchmarks.models
    dtype: str
    workloads: list[dict] = field(default_factory=list)
    round: int = 1


def plan(scale: Scale, engines: tuple[Engine, ...]) -> list[WorkerRun]:
    """Single-stream runs first, then batch; runs sharing engine, model, dtype and
    round merge. The plugin and mlx-lm decode a single stream twice, in the order
    A B B A (on the 4-bit model: the plugin on quantized kernels), so that this
    shared machine's drift over minutes falls on both alike."""
    runs: dict[tuple, WorkerRun] = {}

    def add(engine, model, dtype, workload, round=1):
        key = (engine.key, model, dtype, round)
        runs.setdefault(key, WorkerRun(engine, model, dtype, round=round)).workloads.append(
            {**workload, "round": round})

    for variant in scale.single_dtypes:
        model, _ = single_run(scale, variant)
        runs_here = single_engines(engines, variant)
        for engine in runs_here:
            add(engine, model, variant, {"kind": "single"})
        compared = (PLUGIN_QUANTIZED if variant == QUANTIZED else PLUGIN, MLX_LM)
        for engine in reversed([e for e in runs_here if e in compared]):
            add(engine, model, variant, {"kind": "single"}, round=2)
    for engine in engines:
        add(engine, scale.concurrency_model, scale.concurrency_dtype, {"kind": "batch"})
    if MLX_LM in engines:
        add(MLX_LM, scale.concurrency_model, scale.concurrency_dtype, {"kind": "forward"})
    return list(runs.values())


def single_engines(engines: tuple[Engine, ...], variant: str) -> list[Engine]:
    """The 4-bit checkpoint: the plugin as it loads it by default, the plugin on
    MLX's quantized kernels, and mlx-lm (vLLM's CPU backend reads no MLX format)."""
    if variant != QUANTIZED:
        return list(engines)
    plugin = [PLUGIN, PLUGIN_QUANTIZED] if PLUGIN in engines else []
    return plugin + [e for e in engines if e is MLX_LM]


def with_prompts(workload: dict, scale: Scale, vocab_size: int) -> dict:
    if workload["kind"] == "single":
        prompt = random_prompt(scale.single_prompt_len, vocab_size, seed=1)
        return {**workload, "prompt": prompt, "max_tokens": scale.single_new_tokens}
    if workload["kind"] == "forward":
        return {**workload, "prompt_len": scale.serve_prompt_len, "output_len": scale.serve_output_len,
                "concurrencies": list(scale.serve_concurrencies), "vocab_size": vocab_size}
    shortest, longest = scale.batch_prompt_range
    prompts = batch_prompts(scale.batch_requests, shortest, longest, vocab_size)
    return {**workload, "prompts": prompts, "max_tokens": scale.batch_new_tokens}


def worker_spec(run: WorkerRun, scale: Scale, model_dir: Path, vocab_size: int) -> dict:
    return {
        "engine": run.engine.worker,
        "model": str(model_dir),
        "dtype": single_run(scale, run.dtype)[1] if run.dtype == QUANTIZED else run.dtype,
        "kv_cache_bytes": scale.kv_cache_bytes,
        "max_model_len": scale.max_model_len,
        "max_num_seqs": max(scale.batch_requests, 1),
        "enforce_eager": scale.cpu_backend_eager,
        "workloads": [with_prompts(w, scale, vocab_size) for w in run.workloads],
    }


def execute(run: WorkerRun, scale: Scale, model_dir: Path, vocab_size: int, logs: Path) -> list[dict]:
    """Rows for each workload of ``run``; a failed worker gives rows with a status, not an exception."""
    suffix = "" if run.round == 1 else f"-round{run.round}"
    log = logs / f"{run.engine.key}-{run.model}-{run.dtype}{suffix}.log"
    base = {"engine": run.engine.key, "model": run.model, "dtype": run.dtype, "log": str(log)}
    env = engine_env(run.engine.use_mlx, VLLM_METAL_DEBUG="1" if run.engine is PLUGIN else "0",
                     **dict(run.engine.env))
    started = time.perf_counter()
    try:
        with ForeignCpu() as foreign:
            result = run_worker(worker_spec(run, scale, model_dir, vocab_size), env, log, scale.timeout_s)
    except WorkerFailed as error:
        return [{**base, "kind": w["kind"], "status": f"failed: {error}"} for w in run.workloads]
    rows = []
    for workload, metrics in zip(run.workloads, result["results"]):
        row = {**base, "kind": workload["kind"], "round": run.round, "status": "ok",
               "startup_s": result["startup_s"],
               "other_cpu": share_of_machine(foreign.seconds, time.perf_counter() - started), **metrics}
        if run.engine is PLUGIN and workload["kind"] == "single":
            row["step"] = overhead.step_breakdown(log, metrics["itl_p50_ms"],
                                                  scale.single_new_tokens - 1)
        rows.append(row)
    return rows


def unavailable_rows(engine: Engine, scale: Scale, reason: str) -> list[dict]:
    rows = []
    for run in plan(scale, (engine,)):
        for workload in run.workloads:
            rows.append({"engine": engine.key, "model": run.model, "dtype": run.dtype,
                         "kind": workload["kind"], "status": reason})
    return rows


def combine_rounds(rows: list[dict]) -> list[dict]:
    """One single-stream row per engine and dtype, with the mean of its rounds'
    decode rate, TTFT and ITL (each round's rate kept in ``round_decode_tok_s``)."""
    combined, first = [], {}
    for row in rows:
        key = (row["engine"], row["dtype"])
        if row["kind"] != "single" or not str(row["status"]).startswith("ok"):
            combined.append(row)
        elif key in first:
            first[key]["rounds"].append(row)
        else:
            first[key] = {**row, "rounds": [row]}
            combined.append(first[key])
    for row in first.values():
        rounds = row.pop("rounds")
        for metric in ("decode_tok_s", "ttft_s", "itl_p50_ms", "itl_mean_ms"):
            row[metric] = sum(r[metric] for r in rounds) / len(rounds)
        row["round_decode_tok_s"] = [r["decode_tok_s"] for r in rounds]
    return combined
