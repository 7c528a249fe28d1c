"""Offline measurements in a fresh process (so engines never share memory,
threads or a BLAS), driven by ``benchmarks.run``:

    python -m benchmarks.worker SPEC.json RESULT.json

SPEC: {"engine": "vllm" | "mlx-lm", "model", "dtype", "kv_cache_bytes",
"max_model_len", "max_num_seqs", "enforce_eager", "workloads": [...]}, each
workload {"kind": "single", "prompt", "max_tokens"}, {"kind": "batch",
"prompts", "max_tokens"} or (mlx-lm only) {"kind": "forward", "prompt_len",
"output_len", "concurrencies", "vocab_size"}. RESULT: {"startup_s", "results": [one dict per workload]}.
For "vllm", VLLM_METAL_USE_MLX in the environment picks the plugin or vLLM's CPU backend.
"""

import json
import sys
import time


def run_vllm(spec: dict) -> dict:
    from benchmarks import offline_vllm

    started = time.perf_counter()
    llm = offline_vllm.make_llm(
        spec["model"], spec["dtype"], spec["kv_cache_bytes"], spec["max_model_len"],
        spec["max_num_seqs"], spec.get("enforce_eager", False),
    )
    startup = time.perf_counter() - started
    results = []
    for workload in spec["workloads"]:
        if workload["kind"] == "single":
            results.append(offline_vllm.single_stream(llm, workload["prompt"], workload["max_tokens"]))
        else:
            results.append(offline_vllm.batch_throughput(llm, workload["prompts"], workload["max_tokens"]))
    return {"startup_s": startup, "results": results}


def run_mlx_lm(spec: dict) -> dict:
    from benchmarks.blas import preload_openblas

    blas = preload_openblas()
    from benchmarks import offline_mlx_lm

    started = time.perf_counter()
    model, tokenizer = offline_mlx_lm.load(spec["model"], spec["dtype"])
    startup = time.perf_counter() - started
    results = []
    for workload in spec["workloads"]:
        if workload["kind"] == "single":
            results.append(offline_mlx_lm.single_stream(
                model, tokenizer, workload["prompt"], workload["max_tokens"]))
        elif workload["kind"] == "forward":
            results.append(offline_mlx_lm.forward_ceiling(
                model, workload["prompt_len"], workload["output_len"], workload["concurrencies"],
                workload["vocab_size"]))
        else:
            results.append(offline_mlx_lm.batch_throughput(
                model, workload["prompts"], workload["max_tokens"]))
    return {"startup_s": startup, "results": results, "blas": blas or "bundled"}


RUNNERS = {"vllm": run_vllm, "mlx-lm": run_mlx_lm}


def main(argv: list[str]) -> None:
    spec_path, result_path = argv
    with open(spec_path) as f:
        spec = json.load(f)
    result = RUNNERS[spec["engine"]](spec)
    with open(result_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1:])
