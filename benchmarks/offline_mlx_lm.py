"""Offline measurements through mlx-lm's own APIs: ``stream_generate`` for one
stream, ``BatchGenerator`` (what ``batch_generate`` drives) for a batch.
Runs inside a worker process that preloaded OpenBLAS before importing MLX."""

import time

import mlx.core as mx
from mlx.utils import tree_map

from benchmarks.bandwidth import best_seconds
from benchmarks.offline_vllm import WARMUP_TOKENS, batch_record, stream_metrics

DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}


def load(model_path: str, dtype: str):
    """mlx-lm's loader, then a cast of the float weights (as the plugin does for --dtype)."""
    from mlx_lm import load as mlx_lm_load

    model, tokenizer = mlx_lm_load(model_path)
    target = DTYPES[dtype]
    model.update(
        tree_map(
            lambda x: x.astype(target) if mx.issubdtype(x.dtype, mx.floating) else x,
            model.parameters(),
        )
    )
    mx.eval(model.parameters())
    tokenizer.eos_token_ids = set()  # ignore_eos, as the vLLM runs do
    return model, tokenizer


def token_arrival_times(model, tokenizer, prompt: list[int], max_tokens: int):
    from mlx_lm import stream_generate

    start = time.perf_counter()
    stamps = [time.perf_counter() for _ in stream_generate(model, tokenizer, prompt, max_tokens)]
    return start, stamps


def single_stream(model, tokenizer, prompt: list[int], max_tokens: int) -> dict:
    token_arrival_times(model, tokenizer, prompt[:8], WARMUP_TOKENS)
    start, stamps = token_arrival_times(model, tokenizer, prompt, max_tokens)
    return stream_metrics(start, stamps)


def run_batch(model, prompts: list[list[int]], max_tokens: int) -> int:
    """All prompts through one BatchGenerator; returns the tokens generated."""
    from mlx_lm.generate import BatchGenerator

    generator = BatchGenerator(model, stop_tokens=None, max_tokens=max_tokens)
    generator.insert(prompts, [max_tokens] * len(prompts))
    generated, finished = 0, 0
    try:
        for _ in range(len(prompts) * (max_tokens + 64) + 64):  # bounded
            responses = generator.next_generated()
            if not responses:
                break
            generated += len(responses)
            finished += sum(r.finish_reason is not None for r in responses)
            if finished == len(prompts):
                break
    finally:
        generator.close()
    return generated


def batch_throughput(model, prompts: list[list[int]], max_tokens: int) -> dict:
    run_batch(model, [prompts[0][:8]], WARMUP_TOKENS)
    start = time.perf_counter()
    generated = run_batch(model, prompts, max_tokens)
    elapsed = time.perf_counter() - start
    return batch_record(prompts, generated, elapsed)


def forward_ceiling(model, prompt_len: int, output_len: int, concurrencies: list[int],
                    vocab_size: int) -> dict:
    """The serving workload's ceiling set by the MLX forward alone: mlx-lm's model on
    its own dense caches, no scheduling, sampling or HTTP. A request needs one
    prefill of ``prompt_len`` tokens and ``output_len - 1`` decode steps shared by
    ``c`` requests, so c requests take c * prefill + (output_len - 1) * step(c)."""
    from mlx_lm.models.cache import make_prompt_cache

    def tokens(batch, length):
        return mx.random.randint(0, vocab_size, (batch, length)).astype(mx.int32)

    def fill(batch, length):
        """As mlx-lm's generate does: the prompt but its last token fills the cache
        (only the cache is evaluated, so the vocabulary projection runs for the last
        position alone), then the last token gives the logits."""
        cache = make_prompt_cache(model)
        model(tokens(batch, length - 1), cache=cache)
        mx.eval([c.state for c in cache])
        mx.eval(model(tokens(batch, 1), cache=cache))
        return cache

    def prefill(batch):
        fill(batch, prompt_len)

    prefill_rates = {b: b * prompt_len / best_seconds(lambda b=b: prefill(b), 5)
                     for b in sorted({1, min(4, max(concurrencies))})}
    best_batch = max(prefill_rates, key=prefill_rates.get)
    prefill_s = prompt_len / prefill_rates[best_batch]

    steps_ms, ceilings = {}, {}
    context = prompt_len + output_len // 2
    for c in concurrencies:
        cache = fill(c, context)
        step_s = best_seconds(
            lambda c=c, cache=cache: mx.eval(model(tokens(c, 1), cache=cache)), 5)
        steps_ms[str(c)] = 1e3 * step_s
        ceilings[str(c)] = c * output_len / (c * prefill_s + (output_len - 1) * step_s)
    return {"prefill_tok_s": prefill_rates[best_batch], "prefill_batch": best_batch,
            "decode_context": context, "decode_step_ms": steps_ms, "ceiling_tok_s": ceilings}
