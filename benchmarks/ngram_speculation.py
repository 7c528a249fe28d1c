"""Decode speed with and without n-gram speculation on a repetitive prompt, one run.

    .venv/bin/python -m benchmarks.ngram_speculation [--model DIR] [--tokens 128]
"""

import argparse
import time
from pathlib import Path

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2,
         "prompt_lookup_max": 5}
PROMPT = ("List the numbers again exactly as given: " + ", ".join(str(i) for i in range(1, 41))
          + ". Again: " + ", ".join(str(i) for i in range(1, 41)) + ". Again: 1, 2, 3,")


def measure(model: str, tokens: int, speculative_config) -> tuple[float, list[int]]:
    from vllm import LLM, SamplingParams

    llm = LLM(model, kv_cache_memory_bytes=512 << 20, max_model_len=2048,
              speculative_config=speculative_config)
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    try:
        llm.generate([PROMPT], SamplingParams(max_tokens=4, temperature=0.0))
        start = time.perf_counter()
        out = llm.generate([PROMPT], params)[0].outputs[0]
        elapsed = time.perf_counter() - start
    finally:
        llm.llm_engine.engine_core.shutdown()
    return tokens / elapsed, list(out.token_ids)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="models/SmolLM2-135M-Instruct")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--out", default="benchmarks/results/ngram_speculation.md")
    args = parser.parse_args()
    plain, plain_ids = measure(args.model, args.tokens, None)
    spec, spec_ids = measure(args.model, args.tokens, NGRAM)
    table = (
        "| decode (greedy, repetitive prompt) | tokens/s | ratio |\n| --- | --- | --- |\n"
        f"| plain | {plain:.1f} | 1.00 |\n| n-gram speculation (k=4) | {spec:.1f} | {spec / plain:.2f} |\n"
        f"\nSame tokens with and without speculation: {plain_ids == spec_ids}\n"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(table)
    print(table)


if __name__ == "__main__":
    main()
