"""Where the engine's host time goes during decode: cProfile of ``LLM.generate``
with the engine core in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0, so the
scheduler, the runner and MLX's graph issue all run in the profiled thread).

    python -m benchmarks.profile_engine --preset qwen3-0.6b --batch 1 8 --out DIR

Writes, per batch size, ``profile-b{B}.txt`` (the functions with the most own
time and the most cumulative time, and ms per decode step) and the raw
``profile-b{B}.pstats``.
"""

import argparse
import cProfile
import io
import os
import pstats
import time
from pathlib import Path

NEW_TOKENS = 128
PROMPT_TOKENS = 32
KV_CACHE_BYTES = 1 << 30


def model_dir(preset: str | None, arch: str, root: Path) -> Path:
    from vllm_metal.testing.tiny_models import write_tiny_model

    path = root / (preset or f"tiny-{arch}")
    if not (path / "config.json").exists():
        write_tiny_model(arch, path, preset=preset, dtype="bfloat16")
    return path


def profile_batch(llm, batch: int, out: Path) -> dict:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = [TokensPrompt(prompt_token_ids=[(17 * i + 31 * j) % 400 + 3
                                              for j in range(PROMPT_TOKENS)])
               for i in range(batch)]
    llm.generate(prompts, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True),
                 use_tqdm=False)
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    llm.generate(prompts, params, use_tqdm=False)
    profiler.disable()
    seconds = time.perf_counter() - start
    profiler.dump_stats(str(out / f"profile-b{batch}.pstats"))
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    text.write(f"batch {batch}: {seconds * 1e3 / NEW_TOKENS:.2f} ms per step "
               f"(with cProfile on), {batch * NEW_TOKENS / seconds:.0f} tok/s\n\n")
    stats.sort_stats("tottime").print_stats(40)
    stats.sort_stats("cumulative").print_stats(60)
    (out / f"profile-b{batch}.txt").write_text(text.getvalue())
    return {"batch": batch, "ms_per_step": seconds * 1e3 / NEW_TOKENS}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default=None, help="a tiny_models preset (default: tiny)")
    parser.add_argument("--arch", default="qwen3")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--models", type=Path, default=Path("/tmp/vllm-metal-models"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM

    path = model_dir(args.preset, args.arch, args.models)
    llm = LLM(str(path), dtype="bfloat16", max_model_len=1024, seed=0,
              max_num_seqs=max(max(args.batch), 8), kv_cache_memory_bytes=KV_CACHE_BYTES)
    for batch in args.batch:
        print(profile_batch(llm, batch, args.out), flush=True)


if __name__ == "__main__":
    main()
