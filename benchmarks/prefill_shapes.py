"""What a prompt of a length the engine has not run before costs, against the same
length again: each prompt alone, one token out (its time is the prefill's).

    python -m benchmarks.prefill_shapes [--shape qwen3-0.6b] [--lengths 33 40 ...] [--batch 1]

On MLX's CUDA build a prefill's attention (more than one query, bf16, with a mask)
runs cuDNN's, whose graph is built once per shape of queries, keys and mask and
kept in a cache of 256 (``MLX_CUDA_SDPA_CACHE_SIZE``): a server meeting new prompt
lengths would pay that build in their first tokens' latency. This measures it.
Prompts are fresh random tokens each time (no prefix cache hits). The engine is
``LLM(model)`` as typed, with the benchmark's KV cache size. Writes
``prefill_shapes.md`` and ``.json`` under ``--out``.
"""

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.gpu import KV_CACHE_BYTES, RESULTS, SHAPES, output_to, stop, write_model


def prefill_ms(llm, length: int, batch: int, vocab: int, rng: random.Random) -> float:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = [TokensPrompt(prompt_token_ids=[rng.randrange(10, vocab - 10) for _ in range(length)])
               for _ in range(batch)]
    start = time.perf_counter()
    llm.generate(prompts, SamplingParams(max_tokens=1, temperature=0.0), use_tqdm=False)
    return 1e3 * (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=list(SHAPES), default="qwen3-0.6b")
    parser.add_argument("--lengths", nargs="+", type=int, default=list(range(33, 65, 3)))
    parser.add_argument("--batch", type=int, default=1, help="prompts of each length at once")
    parser.add_argument("--models", type=Path, default=Path(tempfile.gettempdir()) / "vllm-metal-gpu")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    from vllm import LLM

    from vllm_metal.device import select_device

    select_device()
    model_dir = write_model(args.shape, args.models)
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "prefill_shapes.log"
    with output_to(log):
        llm = LLM(str(model_dir), kv_cache_memory_bytes=KV_CACHE_BYTES)
    vocab = llm.llm_engine.model_config.get_vocab_size()
    rng = random.Random(0)
    rows = []
    try:
        with output_to(log):
            prefill_ms(llm, 8, args.batch, vocab, rng)  # the first prefill's one-time costs
            for length in args.lengths:
                first = prefill_ms(llm, length, args.batch, vocab, rng)
                again = [prefill_ms(llm, length, args.batch, vocab, rng) for _ in range(3)]
                rows.append({"length": length, "first_ms": round(first, 1),
                             "again_ms": round(statistics.median(again), 1)})
                print(json.dumps(rows[-1]), flush=True)
    finally:
        stop(llm)
    result = {"shape": args.shape, "batch": args.batch, "rows": rows,
              "first_median_ms": statistics.median(r["first_ms"] for r in rows),
              "again_median_ms": statistics.median(r["again_ms"] for r in rows)}
    (args.out / "prefill_shapes.json").write_text(json.dumps(result, indent=1))
    lines = [f"# A prompt length's first prefill against the same length again ({args.shape}, "
             f"batch {args.batch})", "", "| length | first ms | again ms (median of 3) |",
             "| --- | --- | --- |"]
    lines += [f"| {r['length']} | {r['first_ms']} | {r['again_ms']} |" for r in rows]
    lines += ["", f"Medians: first {result['first_median_ms']:.1f} ms, again "
                  f"{result['again_median_ms']:.1f} ms."]
    (args.out / "prefill_shapes.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
