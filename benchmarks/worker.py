"""One offline measurement in a fresh process (so engines never share memory,
threads or a BLAS), driven by ``benchmarks.run``:

    python -m benchmarks.worker SPEC.json RESULT.json

SPEC: {"engine": "vllm" | "mlx-lm", "workload": "single" | "batch", "model",
"dtype", "prompts", "max_tokens", "kv_cache_bytes", "max_model_len"}.
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
        max_num_seqs=max(len(spec["prompts"]), 1),
        enforce_eager=spec.get("enforce_eager", False),
    )
    startup = time.perf_counter() - started
    if spec["workload"] == "single":
        result = offline_vllm.single_stream(llm, spec["prompts"][0], spec["max_tokens"])
    else:
        result = offline_vllm.batch_throughput(llm, spec["prompts"], spec["max_tokens"])
    return {**result, "startup_s": startup}


def run_mlx_lm(spec: dict) -> dict:
    from benchmarks.blas import preload_openblas

    blas = preload_openblas()
    from benchmarks import offline_mlx_lm

    started = time.perf_counter()
    model, tokenizer = offline_mlx_lm.load(spec["model"], spec["dtype"])
    startup = time.perf_counter() - started
    if spec["workload"] == "single":
        result = offline_mlx_lm.single_stream(model, tokenizer, spec["prompts"][0], spec["max_tokens"])
    else:
        result = offline_mlx_lm.batch_throughput(model, spec["prompts"], spec["max_tokens"])
    return {**result, "startup_s": startup, "blas": blas or "bundled"}


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
