"""Offline measurements through vLLM's ``LLM`` (the plugin, or vLLM's CPU
backend when VLLM_METAL_USE_MLX=0). Runs inside a worker process."""

import time

WARMUP_TOKENS = 4


def make_llm(model: str, dtype: str, kv_cache_bytes: int, max_model_len: int, max_num_seqs: int,
             enforce_eager: bool = False):
    from vllm import LLM

    return LLM(
        model=model,
        tokenizer=model,
        dtype=dtype,
        kv_cache_memory_bytes=kv_cache_bytes,
        max_model_len=max_model_len,
        max_num_seqs=max_num_seqs,
        enable_prefix_caching=False,
        seed=0,
        enforce_eager=enforce_eager,
    )


def greedy(max_tokens: int, delta: bool = False):
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    kind = RequestOutputKind.DELTA if delta else RequestOutputKind.FINAL_ONLY
    return SamplingParams(
        temperature=0.0, max_tokens=max_tokens, ignore_eos=True, detokenize=False, output_kind=kind
    )


def token_arrival_times(llm, prompt: list[int], max_tokens: int) -> tuple[float, list[float]]:
    """Submit one request, step the engine, and time-stamp each new token."""
    engine = llm.llm_engine
    start = time.perf_counter()
    engine.add_request(f"single-{start}", {"prompt_token_ids": prompt}, greedy(max_tokens, delta=True))
    stamps: list[float] = []
    for _ in range(max_tokens * 4 + 16):  # bounded: one token per step, plus prefill chunks
        if not engine.has_unfinished_requests():
            break
        for output in engine.step():
            now = time.perf_counter()
            stamps.extend(now for _ in output.outputs[0].token_ids)
    return start, stamps


def single_stream(llm, prompt: list[int], max_tokens: int) -> dict:
    token_arrival_times(llm, prompt[:8], WARMUP_TOKENS)
    start, stamps = token_arrival_times(llm, prompt, max_tokens)
    return stream_metrics(start, stamps)


def stream_metrics(start: float, stamps: list[float]) -> dict:
    """TTFT, and the decode rate over the tokens after the first (prefill excluded)."""
    decode_s = stamps[-1] - stamps[0]
    gaps = sorted(b - a for a, b in zip(stamps, stamps[1:])) or [float("nan")]
    return {
        "ttft_s": stamps[0] - start,
        "output_tokens": len(stamps),
        "decode_tok_s": (len(stamps) - 1) / decode_s if decode_s > 0 else float("nan"),
        "itl_mean_ms": 1e3 * decode_s / max(len(stamps) - 1, 1),
        "itl_p50_ms": 1e3 * gaps[len(gaps) // 2],
    }


def batch_throughput(llm, prompts: list[list[int]], max_tokens: int) -> dict:
    llm.generate([{"prompt_token_ids": prompts[0][:8]}], greedy(WARMUP_TOKENS), use_tqdm=False)
    start = time.perf_counter()
    outputs = llm.generate(
        [{"prompt_token_ids": p} for p in prompts], greedy(max_tokens), use_tqdm=False
    )
    elapsed = time.perf_counter() - start
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    return batch_record(prompts, generated, elapsed)


def batch_record(prompts: list[list[int]], generated: int, elapsed: float) -> dict:
    """The offline-batch figures every engine reports."""
    return {
        "requests": len(prompts),
        "prompt_tokens": sum(map(len, prompts)),
        "output_tokens": generated,
        "elapsed_s": elapsed,
        "output_tok_s": generated / elapsed,
    }
