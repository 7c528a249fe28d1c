"""The engine against mlx-lm on an accelerator (MLX's CUDA build or Metal).

    python -m benchmarks.gpu                          # everything below (about 15 min on an H100)
    python -m benchmarks.gpu --variants default --rounds 3   # about 20 min on an H100
    python -m benchmarks.gpu --parts offline          # about 6 min
    python -m benchmarks.gpu --parts online --out DIR # three server starts a shape

For each model shape (random bf16 weights, written here): mlx-lm's plain decode
loop, the plugin's offline ``LLM.generate`` and mlx-lm again (A B A: the
machine drifts), at each batch size; the plugin with asynchronous scheduling
off and with ``--enforce-eager`` as well (each feature's share); the bandwidth limit (weight bytes over the
measured copy rate); the plugin's host time per step from VLLM_METAL_DEBUG's
step lines. Then, for each shape, ``vllm serve`` against ``mlx_lm.server`` through
``vllm bench serve`` at several concurrencies, each after as many unmeasured
requests as clients (mlx_lm.server, vllm serve, mlx_lm.server again). Last, at batch 1, the
device's busy time a step during one profiled generate against the engine's
(``benchmarks.engine_timeline``). Writes ``benchmarks/results/gpu.md``,
``gpu.json`` and ``gpu.png``.
"""

import argparse
import contextlib
import dataclasses
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.overhead import STEP_LINE, step_ms, step_parts

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = {"qwen3-0.6b": ("qwen3", (1, 8, 32)), "llama-3-8b": ("llama", (1, 8, 12)),
          "tiny": ("qwen3", (1, 4)),  # tiny: the smoke test's, on any machine
          # Qwen3-0.6B's layers, heads and graph with little arithmetic: the host's
          # cost per step, on any machine.
          "deep-tiny": ("qwen3", (1, 8))}
NARROW = {"deep-tiny": dict(num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                            head_dim=128, hidden_size=64, intermediate_size=128)}
# The plugin as users get it, and with one feature off, to show each one's share.
# Settings (``VLLM_METAL_*``) go to the engine's environment, the rest to ``LLM``.
VARIANTS = {"default": {}, "sync": {"async_scheduling": False}, "eager": {"enforce_eager": True},
            "unfused": {"VLLM_METAL_FUSE_PROJECTIONS": "0"},
            "no-kernel": {"VLLM_METAL_PAGED_ATTENTION_KERNEL": "0"},
            "no-gemv": {"VLLM_METAL_GEMV_KERNEL": "0"},
            # Projections of 9 to 32 rows of small weights by the tensor-core kernel (not matmul).
            "tensor-cores": {"VLLM_METAL_GEMV_TENSOR_CORES": "1"},
            # mlx-lm's layers (with the kernels above) instead of the fused decode step.
            "layers": {"VLLM_METAL_FUSED_DECODE_BLOCK": "0"},
            "layers-in-place": {"VLLM_METAL_FUSED_DECODE_BLOCK": "0", "VLLM_METAL_KV_WRITE_IN_PLACE": "1"},
            "layers-key-per-lane": {"VLLM_METAL_FUSED_DECODE_BLOCK": "0",
                                    "VLLM_METAL_PAGED_ATTENTION_KEY_PER_LANE": "1"},
            # The fused decode step, its keys and values written by a scatter.
            "fused-scatter": {"VLLM_METAL_KV_WRITE_IN_PLACE": "0"},
            # Each prompt chunk in a forward of its own (not padded with like ones).
            "prompts-alone": {"VLLM_METAL_BATCH_PROMPTS": "0"},
            # The runner's MLX work on the engine's thread (vLLM's Python and MLX's issue in turn).
            "inline": {"VLLM_METAL_RUNNER_THREAD": "0"},
            # MLX's CUDA graphs of up to 100 kernels (default 20) for the engine only.
            "graphs100": {"MLX_MAX_OPS_PER_BUFFER": "100", "MLX_CUDA_GRAPH_CACHE_SIZE": "400"},
            # MLX's kernels launched one by one on the stream, not gathered into CUDA graphs.
            "no-graphs": {"MLX_USE_CUDA_GRAPHS": "0"}}
# The fused decode step's attention with this many warps a block (default: by batch size).
VARIANTS.update({f"attn-warps-{w}": {"VLLM_METAL_ATTENTION_WARPS": str(w)} for w in (4, 8, 16, 32)})
# The matrix-vector kernel with this SPLIT-UNROLL for every weight (default: by shape).
VARIANTS.update({f"gemv-{c}": {"VLLM_METAL_GEMV_SPLIT_UNROLL": c}
                 for c in ("1-2", "1-4", "2-2", "2-4", "4-2", "4-4")})
# The vector kernel's split 4, unroll 4 (its choice at 1 and 2 rows) with this many weight rows
# a group of warps, at every number of rows.
VARIANTS.update({f"gemv-rows-{r}": {"VLLM_METAL_GEMV_SPLIT_UNROLL": f"4-4-{r}"} for r in (2, 4)})
# Both kernels as they were before their choices by batch and rows (4 warps; 1-2).
VARIANTS["previous-kernels"] = {"VLLM_METAL_ATTENTION_WARPS": "4",
                                "VLLM_METAL_GEMV_SPLIT_UNROLL": "1-2"}
VARIANT_SHAPES = ("qwen3-0.6b", "tiny", "deep-tiny")  # shapes that also run the variants beside the default
PROMPT_LEN, NEW_TOKENS = 32, 128
KV_CACHE_BYTES = 8 << 30
CONCURRENCIES = (1, 8, 32)


# ------------------------------------------------------------------ models

def write_model(shape: str, root: Path) -> Path:
    from vllm_metal.testing.tiny_models import write_tiny_model

    arch, _ = SHAPES[shape]
    out = root / shape
    if not (out / "config.json").exists():
        start = time.perf_counter()
        preset = shape if shape not in ("tiny", *NARROW) else None
        write_tiny_model(arch, out, dtype="bfloat16", preset=preset, **NARROW.get(shape, {}))
        print(f"wrote {shape} in {time.perf_counter() - start:.0f} s", flush=True)
    return out


def prompts(batch: int, vocab: int, seed: int = 0) -> list[list[int]]:
    import random

    rng = random.Random(seed + batch)
    return [[rng.randrange(10, vocab - 10) for _ in range(PROMPT_LEN)] for _ in range(batch)]


# ------------------------------------------------------------ mlx-lm loop

def mlx_lm_tokens_per_s(model, batch_prompts: list[list[int]]) -> float:
    """mlx-lm's model and KV cache in the loop its generate_step runs: step n+1
    is issued before step n's tokens are read."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    start = time.perf_counter()
    y = mx.argmax(model(mx.array(batch_prompts), cache=cache)[:, -1], axis=-1)
    mx.async_eval(y)
    for _ in range(NEW_TOKENS - 1):
        next_y = mx.argmax(model(y[:, None], cache=cache)[:, -1], axis=-1)
        mx.async_eval(next_y)
        y.tolist()
        y = next_y
    y.tolist()
    return len(batch_prompts) * NEW_TOKENS / (time.perf_counter() - start)


# ------------------------------------------------------------- the plugin

@contextlib.contextmanager
def output_to(path: Path):
    """The engine process inherits this process's stdout and stderr (vLLM logs to
    stdout): its step lines land in ``path``."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(path, "ab") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, copy in zip((1, 2), saved):
            os.dup2(copy, fd)
            os.close(copy)


def start_plugin(model_dir: Path, max_batch: int, options: dict, log: Path,
                 kv_bytes: int = KV_CACHE_BYTES):
    from vllm import LLM

    os.environ["VLLM_METAL_DEBUG"] = "1"
    settings = {k: v for k, v in options.items() if k.startswith(("VLLM_METAL_", "MLX_"))}
    saved = {k: os.environ.get(k) for k in settings}
    os.environ.update(settings)
    try:
        with output_to(log):
            return LLM(str(model_dir), dtype="bfloat16", max_model_len=1024, seed=0,
                       max_num_seqs=max(max_batch, 8), kv_cache_memory_bytes=kv_bytes,
                       **{k: v for k, v in options.items() if k not in settings})
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def plugin_tokens_per_s(llm, batch_prompts: list[list[int]], log: Path) -> float:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    requests = [TokensPrompt(prompt_token_ids=p) for p in batch_prompts]
    with output_to(log):
        start = time.perf_counter()
        outputs = llm.generate(requests, params, use_tqdm=False)
        seconds = time.perf_counter() - start
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    return generated / seconds


def step_timings(log: Path, batch: int) -> dict:
    """Median ms of each part of the decode steps of ``batch`` requests in ``log``."""
    parts: dict[str, list[float]] = {}
    for match in STEP_LINE.finditer(log.read_text(errors="replace")):
        if int(match["reqs"]) != batch or int(match["tokens"]) != batch:
            continue
        for name, ms in step_parts(match).items():
            parts.setdefault(name, []).append(ms)
    return {name: round(statistics.median(v), 2) for name, v in parts.items()}


def plugin_key(variant: str) -> str:
    """The prefix of a variant's figures in a result row."""
    return "plugin" if variant == "default" else f"plugin_{variant}"


def slowest_step(log_text: str) -> dict | None:
    """The step line of ``log_text`` whose parts add up to the most: its requests,
    tokens, total ms and parts (a one-time cost, such as a kernel compiled at its first
    launch, shows in the step that pays it)."""
    slowest = None
    for match in STEP_LINE.finditer(log_text):
        parts = step_parts(match)
        total = step_ms(parts)
        if slowest is None or total > slowest["ms"]:
            slowest = {"reqs": int(match["reqs"]), "tokens": int(match["tokens"]),
                       "ms": round(total, 2), "parts": parts}
    return slowest


def log_after(log: Path, offset: int) -> str:
    with open(log, "rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


def stop(llm) -> None:
    llm.llm_engine.engine_core.shutdown()


# --------------------------------------------------------------- offline

def copy_rate_gb_s() -> float:
    import mlx.core as mx

    buffer = mx.zeros((1 << 28,), dtype=mx.float32)  # 1 GiB
    mx.eval(buffer)
    best = float("inf")
    for _ in range(6):
        start = time.perf_counter()
        mx.eval(buffer + 1)
        best = min(best, time.perf_counter() - start)
    return 2 * buffer.nbytes / best / 1e9


def read_rate_gb_s() -> float:
    """A sum over 2 GiB: memory read only, as a decode step reads its weights (a
    copy also writes)."""
    import mlx.core as mx

    buffer = mx.ones((1 << 30,), dtype=mx.bfloat16)
    mx.eval(buffer)
    best = float("inf")
    for _ in range(6):
        start = time.perf_counter()
        mx.eval(mx.sum(buffer))  # the value is not used, only the read
        best = min(best, time.perf_counter() - start)
    return buffer.nbytes / best / 1e9


def offline(shape: str, model_dir: Path, logs: Path, rate_gb_s: float,
            variants: list[str], variants_given: bool = False, rounds: int = 1,
            batches: list[int] | None = None) -> list[dict]:
    import mlx.core as mx
    from mlx_lm import load

    from vllm_metal.models.loader import weight_bytes

    batches = batches or SHAPES[shape][1]
    model, _ = load(str(model_dir))
    vocab = model.args.vocab_size
    weights = weight_bytes(model)
    mlx_lm_tokens_per_s(model, prompts(1, vocab))  # first-call costs
    rows = []
    names = ["default"] + ([v for v in variants if v != "default"]
                           if shape in VARIANT_SHAPES or variants_given else [])
    engines = {}
    for name in names:
        log = logs / f"{shape}-{name}.log"
        # Small shapes run on small machines too: three engines at once.
        kv_bytes = KV_CACHE_BYTES if shape not in ("tiny", *NARROW) else 1 << 30
        engines[name] = (start_plugin(model_dir, max(batches), VARIANTS[name], log, kv_bytes), log)
        plugin_tokens_per_s(engines[name][0], prompts(2, vocab, seed=1), log)  # warm-up
    for batch in batches:
        # Fresh prompts for every run: a repeated prompt would hit the engine's prefix
        # cache, which mlx-lm's loop has not.
        fresh = (prompts(batch, vocab, seed=seed) for seed in itertools.count(100 * batch))
        row = {"shape": shape, "batch": batch, "weights_gb": round(weights / 1e9, 2),
               "limit_tok_s": round(batch * rate_gb_s * 1e9 / weights, 1)}
        mlx_lm_tokens_per_s(model, next(fresh))  # this batch's first-call costs
        mlx_lm_runs = [mlx_lm_tokens_per_s(model, next(fresh))]
        runs = {name: [] for name in engines}
        for name, (llm, log) in engines.items():
            key = plugin_key(name)
            # The first run at a batch size traces its decode graphs (once per
            # shape bucket, kept for the engine's life): shown, not compared.
            start = log.stat().st_size
            row[f"{key}_first"] = plugin_tokens_per_s(llm, next(fresh), log)
            row[f"{key}_first_slowest_step"] = slowest_step(log_after(log, start))
        for _ in range(rounds):  # each round: every engine, then mlx-lm (A B A ...)
            for name, (llm, log) in engines.items():
                runs[name].append(plugin_tokens_per_s(llm, next(fresh), log))
            mlx_lm_runs.append(mlx_lm_tokens_per_s(model, next(fresh)))
        for name, (llm, log) in engines.items():
            key = plugin_key(name)
            row[key] = statistics.median(runs[name])
            row[f"{key}_steps_ms"] = step_timings(log, batch)
            if rounds > 1:
                row[f"{key}_runs"] = [round(v, 1) for v in runs[name]]
        row["mlx_lm_a"], row["mlx_lm_b"] = mlx_lm_runs[0], mlx_lm_runs[-1]
        if rounds > 1:
            row["mlx_lm_runs"] = [round(v, 1) for v in mlx_lm_runs]
        mlx_lm = statistics.median(mlx_lm_runs)
        row["ratio"] = row["plugin"] / mlx_lm
        for name in names[1:]:
            row[f"ratio_{name}"] = row[f"plugin_{name}"] / mlx_lm
        rows.append({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()})
        print(json.dumps(rows[-1]), flush=True)
    for llm, _ in engines.values():
        stop(llm)
    del model
    mx.clear_cache()
    return rows


# ---------------------------------------------------------------- online

# mlx_lm.server, the plugin's server, mlx_lm.server again (A B A: the machine drifts).
ONLINE_ROUNDS = (("mlx_lm.server", "mlx_lm_a"), ("vllm serve", "plugin"),
                 ("mlx_lm.server", "mlx_lm_b"))


def online_runs(scale) -> list[tuple[str, dict, list[str]]]:
    """Each concurrency's measured run, after an unmeasured one of as many distinct
    prompts as clients (their own seed: no prefix shared with the measured prompts),
    so a concurrency's figure is the servers' steady state, not their first batched
    prefill of distinct prompts (vllm bench's own warm-up repeats one prompt, whose
    copies hit a prefix cache). The one-time costs show in the offline part's first runs."""
    from benchmarks import serving

    runs = []
    for c in scale.serve_concurrencies:
        runs += [("warm-up", {"concurrency": c},
                  serving.concurrency_args(scale, c, prompts=c) + ["--seed", str(1000 + c)]),
                 ("serving", {"concurrency": c}, serving.concurrency_args(scale, c))]
    return runs


def online(shape: str, model_dir: Path, logs: Path) -> list[dict]:
    """Per concurrency: output tok/s of each round, the plugin's over the mean of
    mlx_lm.server's two, and both servers' latencies."""
    from benchmarks import serving
    from benchmarks.scales import SCALES

    scale = dataclasses.replace(
        SCALES["smoke"], name="gpu", serve_concurrencies=CONCURRENCIES, serve_prompt_len=PROMPT_LEN,
        serve_output_len=NEW_TOKENS, serve_prompts_per_client=2, kv_cache_bytes=KV_CACHE_BYTES,
        max_model_len=1024, timeout_s=420)
    runs = online_runs(scale)
    rounds = {}
    for engine, name in ONLINE_ROUNDS:
        folder = logs / f"online-{shape}-{name}"
        folder.mkdir(parents=True, exist_ok=True)
        rows = serving.run_session(serving.Session(engine, True, runs), scale, model_dir,
                                   "bfloat16", folder)
        rounds[name] = {row["concurrency"]: row for row in rows if row["kind"] == "serving"}
        print(json.dumps({"shape": shape, "round": name,
                          "tok_s": {c: r.get("output_tok_s") for c, r in rounds[name].items()}}),
              flush=True)
    rows = []
    for concurrency in scale.serve_concurrencies:
        got = {name: rounds[name].get(concurrency, {}) for _, name in ONLINE_ROUNDS}
        row = {"shape": shape, "concurrency": concurrency,
               **{name: r.get("output_tok_s") for name, r in got.items()},
               "status": "; ".join(f"{name} {r.get('status')}" for name, r in got.items()
                                   if r.get("status") != "ok")}
        for key in ("ttft_p50_ms", "itl_p50_ms", "itl_p99_ms"):
            row[f"plugin_{key}"] = got["plugin"].get(key)
            row[f"mlx_lm_{key}"] = got["mlx_lm_a"].get(key)
        baseline = [v for v in (row["mlx_lm_a"], row["mlx_lm_b"]) if v]
        row["ratio"] = (round(row["plugin"] / statistics.mean(baseline), 3)
                        if row["plugin"] and baseline else None)
        rows.append(row)
    return rows


# --------------------------------------------------------------- timeline

def timeline(shape: str, model_dir: Path, logs: Path, offline_rows: list[dict]) -> list[dict]:
    """At batch 1: the device's busy time a step during one profiled generate
    (``benchmarks.engine_timeline``, the engine core in this process) against the
    engine's own ms a step, its unprofiled runs' and this run's offline part's."""
    from benchmarks import engine_timeline

    (result,) = engine_timeline.measure(str(model_dir), [1], logs / f"timeline-{shape}",
                                        engines=("in_process",))
    device = engine_timeline.device_ms_a_step(result)
    engine = statistics.median(engine_timeline.ms_a_step(1, t) for t in result["in_process_tok_s"])
    offline_tok_s = next((r["plugin"] for r in offline_rows
                          if r["shape"] == shape and r["batch"] == 1), None)
    row = {"shape": shape, "batch": 1, "device_ms": device, "engine_ms": engine,
           "offline_ms": offline_tok_s and engine_timeline.ms_a_step(1, offline_tok_s),
           "timeline": result["timeline"]}
    for key in ("engine", "offline"):
        if device and row[f"{key}_ms"]:
            row[f"{key}_above_device"] = row[f"{key}_ms"] / device - 1
    return [{k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}]


# ---------------------------------------------------------------- report

def fmt(value, digits=0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _rate_text(result: dict) -> str:
    if "read_gb_s" not in result:
        return f"{result['copy_gb_s']:.0f} GB/s (a copy)"
    return (f"{result['rate_gb_s']:.0f} GB/s (the faster of a copy, {result['copy_gb_s']:.0f}, "
            f"and a read-only sum, {result['read_gb_s']:.0f})")


def report(result: dict) -> str:
    lines = ["# vllm-metal on an accelerator", "",
             f"`python -m benchmarks.gpu`, {result['device']}, MLX {result['mlx']}, "
             f"{result['minutes']:.1f} min. Random bf16 weights, {PROMPT_LEN}-token prompts, "
             f"{NEW_TOKENS} greedy tokens (ignore_eos). Each row, after one unmeasured mlx-lm run at "
             f"its batch: mlx-lm, each engine once (its first run traces the batch's decode "
             f"graphs), then {result.get('rounds', 1)} round(s) of each engine followed by mlx-lm; "
             f"figures are medians over the rounds, ratio = plugin / median of mlx-lm's runs "
             f"(A and A': its first and last). Memory rate {_rate_text(result)}; "
             f"limit = batch x rate / weight bytes.", "",
             "## Offline decode, tok/s", ""]
    rows = result["offline"]
    others = [v for v in VARIANTS if v != "default" and any(f"plugin_{v}" in r for r in rows)]
    head = ["shape", "batch", "mlx-lm (A / A')", "plugin (first run)", "plugin", "ratio"]
    for name in others:
        head += [f"plugin, {name}", "ratio"]
    head += ["limit", "plugin % of limit"]
    lines += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        cells = [r["shape"], r["batch"], f"{fmt(r['mlx_lm_a'])} / {fmt(r['mlx_lm_b'])}",
                 fmt(r.get("plugin_first")), fmt(r["plugin"]), fmt(r["ratio"], 2)]
        for name in others:
            cells += [fmt(r.get(f"plugin_{name}")), fmt(r.get(f"ratio_{name}"), 2)]
        cells += [fmt(r["limit_tok_s"]), f"{100 * r['plugin'] / r['limit_tok_s']:.0f}%"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines += ["", "## The plugin's host time per decode step (median ms, VLLM_METAL_DEBUG)", "",
              "| shape | batch | variant | step parts |", "| --- | --- | --- | --- |"]
    for r in rows:
        for name in ["default"] + others:
            key = f"{plugin_key(name)}_steps_ms"
            if r.get(key):
                parts = ", ".join(f"{k} {v}" for k, v in r[key].items())
                lines.append(f"| {r['shape']} | {r['batch']} | {name} | {parts} |")
    slowest = [(r, name, r.get(f"{plugin_key(name)}_first_slowest_step"))
               for r in rows for name in ["default"] + others]
    if any(step for _, _, step in slowest):
        lines += ["", "## The slowest step of the plugin's first run at each batch (VLLM_METAL_DEBUG)",
                  "", "| shape | batch | variant | requests | tokens | ms | parts |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for r, name, step in slowest:
            if step:
                parts = ", ".join(f"{k} {v}" for k, v in step["parts"].items())
                lines.append(f"| {r['shape']} | {r['batch']} | {name} | {step['reqs']} | "
                             f"{step['tokens']} | {step['ms']} | {parts} |")
    if result.get("timeline"):
        lines += ["", "## The step against the device's own time (batch 1; `benchmarks.engine_timeline`: "
                  "the device's busy time during one profiled generate, the engine core in this process)",
                  "", "| shape | device ms a step | engine ms a step (unprofiled runs) | above the device | "
                  "offline part's ms a step | above the device |", "| --- | --- | --- | --- | --- | --- |"]
        for r in result["timeline"]:
            above = {k: (f"{100 * r[k]:.1f}%" if k in r else "-")
                     for k in ("engine_above_device", "offline_above_device")}
            lines.append(f"| {r['shape']} | {fmt(r['device_ms'], 2)} | {fmt(r['engine_ms'], 2)} | "
                         f"{above['engine_above_device']} | {fmt(r['offline_ms'], 2)} | "
                         f"{above['offline_above_device']} |")
    if result.get("online"):
        lines += ["", "## Online, `vllm bench serve` against each server (output tok/s; "
                  "mlx_lm.server, vllm serve, mlx_lm.server again; each concurrency after an "
                  "unmeasured run of as many distinct prompts as clients)", "",
                  "| shape | concurrency | mlx_lm.server (A / A') | vllm serve | ratio | "
                  "TTFT p50 ms (plugin / mlx-lm) | ITL p50 ms | ITL p99 ms | status |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in result["online"]:
            lines.append(
                f"| {r['shape']} | {r['concurrency']} | {fmt(r['mlx_lm_a'])} / {fmt(r['mlx_lm_b'])} | "
                f"{fmt(r['plugin'])} | {fmt(r['ratio'], 2)} | "
                f"{fmt(r['plugin_ttft_p50_ms'])} / {fmt(r['mlx_lm_ttft_p50_ms'])} | "
                f"{fmt(r['plugin_itl_p50_ms'], 1)} / {fmt(r['mlx_lm_itl_p50_ms'], 1)} | "
                f"{fmt(r['plugin_itl_p99_ms'], 1)} / {fmt(r['mlx_lm_itl_p99_ms'], 1)} | "
                f"{r['status'] or 'ok'} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["offline"]
    labels = [f"{r['shape']}\nbatch {r['batch']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(rows)), 4))
    ax.bar(range(len(rows)), [r["ratio"] for r in rows], label="default")
    for name, color in (("sync", "black"), ("eager", "red")):
        ax.scatter(range(len(rows)), [r.get(f"ratio_{name}") or 0 for r in rows], color=color,
                   marker="_", s=400, label=name)
    ax.axhline(1.0, color="gray", linestyle="--")
    ax.set_xticks(range(len(rows)), labels, fontsize=8)
    ax.set_ylabel("plugin tok/s / mlx-lm tok/s")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES),
                        default=["qwen3-0.6b", "llama-3-8b"])
    parser.add_argument("--parts", nargs="+", choices=("offline", "online", "timeline"),
                        default=["offline", "online", "timeline"])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS),
                        help="engine variants beside the default (given: for every shape; "
                             "else sync and eager for the small shapes)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="offline: runs of each engine per batch, each round followed by "
                             "one of mlx-lm's; figures are medians")
    parser.add_argument("--batches", nargs="+", type=int,
                        help="offline: these batch sizes instead of each shape's own")
    parser.add_argument("--models", type=Path, default=Path(tempfile.gettempdir()) / "vllm-metal-gpu")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    from vllm_metal.device import select_device

    select_device()
    import mlx.core as mx

    started = time.perf_counter()
    logs = args.out / "logs-gpu"
    logs.mkdir(parents=True, exist_ok=True)
    info = mx.device_info() if hasattr(mx, "device_info") else {}
    result = {"device": info.get("device_name", str(mx.default_device())), "mlx": mx.__version__,
              "copy_gb_s": copy_rate_gb_s(), "read_gb_s": read_rate_gb_s(), "rounds": args.rounds,
              "offline": [], "online": [], "timeline": []}
    result["rate_gb_s"] = max(result["copy_gb_s"], result["read_gb_s"])
    for shape in args.shapes:
        model_dir = write_model(shape, args.models)
        if "offline" in args.parts:
            result["offline"] += offline(shape, model_dir, logs, result["rate_gb_s"],
                                         args.variants or ["sync", "eager"],
                                         args.variants is not None, args.rounds, args.batches)
            save(result, args.out, started)  # a run cut short keeps what it measured
        if "online" in args.parts:
            result["online"] += online(shape, model_dir, logs)
            save(result, args.out, started)
        if "timeline" in args.parts:
            result["timeline"] += timeline(shape, model_dir, logs, result["offline"])
            save(result, args.out, started)
    save(result, args.out, started)
    print(report(result))


def save(result: dict, out: Path, started: float) -> None:
    result["minutes"] = (time.perf_counter() - started) / 60
    (out / "gpu.json").write_text(json.dumps(result, indent=1))
    (out / "gpu.md").write_text(report(result))
    if result["offline"]:
        plot(result, out / "gpu.png")


if __name__ == "__main__":
    main()
