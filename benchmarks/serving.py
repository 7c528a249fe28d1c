"""Online workloads through ``vllm bench serve``: throughput and latency at
several concurrencies, and TTFT with a long shared prefix, against ``vllm serve``
(the plugin) and ``mlx_lm.server`` -- each started here and always stopped."""

import json
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.procs import (PYTHON, LOCALHOST, WorkerFailed, engine_env, free_port,
                              run_logged, running_server)
from benchmarks.contention import ForeignCpu, share_of_machine
from benchmarks.scales import Scale

SERVER_READY_TIMEOUT_S = 600
# The vllm command beside this Python, or its module where only the package is there.
VLLM_CLI = ([str(Path(PYTHON).with_name("vllm"))] if Path(PYTHON).with_name("vllm").exists()
            else [PYTHON, "-m", "vllm.entrypoints.cli.main"])


@dataclass
class Session:
    """One server start and the benchmark runs made against it."""

    engine: str
    prefix_caching: bool
    runs: list[tuple[str, dict, list[str]]]  # (kind, row fields, bench args)

    def command(self, model_dir: Path, dtype: str, port: int, scale: Scale) -> list[str]:
        if self.engine == "mlx_lm.server":
            return [PYTHON, "-m", "benchmarks.mlx_lm_server", "--model", str(model_dir),
                    "--host", LOCALHOST, "--port", str(port)]
        cmd = [*VLLM_CLI, "serve", str(model_dir), "--host", LOCALHOST, "--port", str(port),
               "--dtype", dtype, "--kv-cache-memory-bytes", str(scale.kv_cache_bytes),
               "--max-model-len", str(scale.max_model_len), "--seed", "0",
               "--uvicorn-log-level", "warning"]
        return cmd if self.prefix_caching else cmd + ["--no-enable-prefix-caching"]


def common_args(base_url: str, model_dir: Path, engine: str) -> list[str]:
    args = ["--backend", "openai", "--base-url", base_url, "--model", str(model_dir),
            "--tokenizer", str(model_dir), "--dataset-name", "random", "--ignore-eos",
            "--temperature", "0", "--seed", "0", "--disable-tqdm", "--save-detailed",
            "--percentile-metrics", "ttft,tpot,itl", "--metric-percentiles", "50,99"]
    if engine == "mlx_lm.server":
        # vllm bench sends "logprobs": null (mlx_lm.server wants a bool) and a
        # repetition_penalty of 1.0 (which mlx_lm.server would apply as a no-op processor)
        args += ["--extra-body", json.dumps({"logprobs": False, "repetition_penalty": 0.0})]
    return args


def concurrency_args(scale: Scale, concurrency: int, warmups: int = 0,
                     prompts: int | None = None) -> list[str]:
    """``warmups``: requests sent first and not measured (each server's first-call
    costs; vllm bench sends its first prompt that many times). ``prompts``: how many
    (by default ``serve_prompts_per_client`` a client, at least 4)."""
    prompts = prompts or max(concurrency * scale.serve_prompts_per_client, 4)
    return ["--num-prompts", str(prompts), "--max-concurrency", str(concurrency),
            "--random-input-len", str(scale.serve_prompt_len),
            "--random-output-len", str(scale.serve_output_len),
            *(["--num-warmups", str(warmups)] if warmups else [])]


def prefix_args(scale: Scale, warmups: int) -> list[str]:
    return ["--num-prompts", str(scale.prefix_requests), "--max-concurrency", "1",
            "--random-prefix-len", str(scale.prefix_len),
            "--random-input-len", str(scale.prefix_suffix_len),
            "--random-output-len", str(scale.prefix_output_len), "--num-warmups", str(warmups)]


def sessions(scale: Scale) -> list[Session]:
    """vllm serve and mlx_lm.server at each concurrency, then the shared-prefix run
    (its first request fills the cache); then, cold, vllm serve without prefix caching."""
    plan = []
    for engine in ("vllm serve", "mlx_lm.server"):
        runs = [("serving", {"concurrency": c}, concurrency_args(scale, c))
                for c in scale.serve_concurrencies]
        runs.append(("prefix", {"prefix_caching": True}, prefix_args(scale, warmups=0)))
        plan.append(Session(engine, True, runs))
    if scale.run_prefix_cold:
        # one warm-up request: with no cache it only takes MLX's first-call costs away
        cold = [("prefix", {"prefix_caching": False}, prefix_args(scale, warmups=1))]
        plan.append(Session("vllm serve", False, cold))
    return plan


def run_session(session: Session, scale: Scale, model_dir: Path, dtype: str, logs: Path) -> list[dict]:
    tag = session.engine.replace(" ", "-") + ("" if session.prefix_caching else "-no-prefix-cache")
    server_log, client_log = logs / f"{tag}.log", logs / f"{tag}-bench.log"
    port = free_port()
    cmd = session.command(model_dir, dtype, port, scale)
    base = {"engine": session.engine, "model_dir": str(model_dir), "dtype": dtype, "log": str(server_log)}
    try:
        server = running_server(cmd, engine_env(True), port, server_log, SERVER_READY_TIMEOUT_S)
        with server as (url, startup):
            started = time.perf_counter()
            with ForeignCpu() as foreign:
                results = run_bench_client(session, url, model_dir, client_log, scale.timeout_s)
            other_cpu = share_of_machine(foreign.seconds, time.perf_counter() - started)
    except WorkerFailed as error:
        return [{**base, "kind": kind, **fields, "status": f"failed: {error}"}
                for kind, fields, _ in session.runs]
    rows = []
    for (kind, fields, _), result in zip(session.runs, results):
        row = {**base, "kind": kind, **fields, "startup_s": startup, "other_cpu": other_cpu}
        rows.append({**row, **summarize(kind, result)})
    return rows


def run_bench_client(session: Session, url: str, model_dir: Path, log: Path, timeout_s: float) -> list[dict]:
    runs = [common_args(url, model_dir, session.engine) + args for _, _, args in session.runs]
    with tempfile.TemporaryDirectory() as tmp:
        runs_path, results_path = Path(tmp, "runs.json"), Path(tmp, "results.json")
        runs_path.write_text(json.dumps(runs))
        cmd = [PYTHON, "-m", "benchmarks.bench_client", str(runs_path), str(results_path)]
        try:
            run_logged(cmd, engine_env(True), log, timeout_s)
        except WorkerFailed as error:
            partial = json.loads(results_path.read_text()) if results_path.exists() else []
            return partial + [{"error": str(error)}] * (len(runs) - len(partial))
        results = json.loads(results_path.read_text()) if results_path.exists() else []
    return results + [{"error": f"no result (see {log})"}] * (len(runs) - len(results))


def summarize(kind: str, result: dict) -> dict:
    if "error" in result:
        return {"status": f"failed: {result['error']}"}
    if not result.get("completed"):
        return {"status": f"failed: {result.get('failed', '?')} requests failed"}
    status = "ok" if not result.get("failed") else f"ok ({result['failed']} requests failed)"
    if kind == "prefix":
        return {"status": status, **prefix_ttfts(result["ttfts"])}
    return {
        "status": status,
        "completed": result["completed"],
        "output_tok_s": result["output_throughput"],
        "ttft_p50_ms": result["p50_ttft_ms"], "ttft_p99_ms": result["p99_ttft_ms"],
        "itl_p50_ms": result["p50_itl_ms"], "itl_p99_ms": result["p99_itl_ms"],
        "tpot_p50_ms": result["p50_tpot_ms"],
    }


def prefix_ttfts(ttfts_s: list[float]) -> dict:
    """At concurrency 1 the first request meets an empty cache; the rest find the prefix."""
    ttfts = [1e3 * t for t in ttfts_s if t and t > 0]
    return {
        "ttft_first_ms": ttfts[0],
        "ttft_rest_p50_ms": statistics.median(ttfts[1:]) if len(ttfts) > 1 else float("nan"),
        "ttft_all_p50_ms": statistics.median(ttfts),
    }
