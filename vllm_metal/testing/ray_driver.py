"""Generate with ``LLM(..., distributed_executor_backend="ray")``, one engine per
model in turn, and print each model's greedy tokens as a JSON line. Tests run it
inside a Ray node's namespace, where a driver must run.

    python -m vllm_metal.testing.ray_driver [--tp N] [--pp M] MODEL [MODEL ...]
"""

import argparse
import json
import time

PROMPTS = ["def add_one(x):", "The quick brown fox jumps over the lazy dog. " * 3]
MAX_TOKENS = 10


def generate(model: str, tp: int, pp: int, backend: str) -> dict:
    from vllm import LLM, SamplingParams

    start = time.monotonic()
    llm = LLM(model, distributed_executor_backend=backend, tensor_parallel_size=tp,
              pipeline_parallel_size=pp, kv_cache_memory_bytes=64 << 20, max_model_len=512,
              dtype="float32", seed=0)
    started = time.monotonic() - start
    try:
        params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
        outputs = llm.generate(PROMPTS, params)
        config = llm.llm_engine.vllm_config
        return {
            "model": model,
            "prompt_ids": [list(o.prompt_token_ids) for o in outputs],
            "tokens": [list(o.outputs[0].token_ids) for o in outputs],
            "executor": getattr(config.parallel_config.distributed_executor_backend,
                                "__name__", None),
            "prefix_caching": config.cache_config.enable_prefix_caching,
            "start_s": round(started, 1),
        }
    finally:
        llm.llm_engine.engine_core.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("models", nargs="+")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--backend", default="ray")
    args = parser.parse_args()
    for model in args.models:
        print("RESULT " + json.dumps(generate(model, args.tp, args.pp, args.backend)),
              flush=True)


if __name__ == "__main__":
    main()
