"""Decode steps run as compiled MLX graphs unless --enforce-eager: the same tokens
either way, through padded batch buckets, per-layer windows, Gemma 2's grouped
mask and requests that join and leave at different steps; and the step does
not copy the KV pools (its cost does not grow with the cache)."""

import re

import pytest
from conftest import engine_greedy_tokens, start_llm, stop_llm
from vllm import SamplingParams
from vllm.inputs import TokensPrompt


def prompts():
    # 7 requests: decode batches of 7, 6, ... rows pad to buckets of 8, 4, 2, 1
    return [TokensPrompt(prompt_token_ids=[(11 * j + 5 * i) % 480 + 3 for j in range(4 + 9 * i)])
            for i in range(7)]


def generate(model: str, enforce_eager: bool) -> list[list[int]]:
    return engine_greedy_tokens(model, prompts(), [10 + 4 * i for i in range(7)],
                                enforce_eager=enforce_eager, max_num_batched_tokens=64)


@pytest.mark.parametrize("arch, overrides", [
    ("qwen3", {}),
    ("gemma2", {"sliding_window": 8}),  # grouped-query mask, every other layer windowed
])
def test_compiled_decode_equals_eager(arch, overrides, tiny_model):
    model = tiny_model(arch, **overrides)
    compiled, eager = generate(model, False), generate(model, True)
    assert [len(t) for t in compiled] == [10 + 4 * i for i in range(7)]
    assert compiled == eager


def step_issue_ms(log: str) -> float:
    times = [float(m) for m in re.findall(r"step \(async\): 1 reqs, 1 tokens \|.*?forward issue "
                                          r"([0-9.]+) ms", log)]
    assert len(times) >= 20, log[-2000:]
    times.sort()
    return times[len(times) // 2]


def test_decode_step_cost_does_not_grow_with_the_cache(tiny_model, capfd, monkeypatch):
    """A pool still referenced by an in-flight graph would be copied whole each step."""
    monkeypatch.setenv("VLLM_METAL_DEBUG", "1")
    model = tiny_model("qwen3")
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    medians = []
    for kv_bytes in (64 << 20, 2 << 30):
        llm = start_llm(model, kv_cache_memory_bytes=kv_bytes)
        try:
            capfd.readouterr()
            llm.generate([prompts()[2]], params)
        finally:
            stop_llm(llm)
        captured = capfd.readouterr()
        medians.append(step_issue_ms(captured.out + captured.err))
    small, large = medians
    # Copying 2 GB of pools takes hundreds of milliseconds here.
    assert large < max(3 * small, small + 20), medians


def test_each_decode_shape_is_traced_once(tiny_model, capfd):
    """Requests joining and leaving (decode batches of 7 down to 1 rows, contexts of
    4 to 90 tokens) trace one graph per bucket of rows and blocks read, never the
    same bucket twice: a retrace per step would cost a trace's time every step."""
    model = tiny_model("qwen3")
    capfd.readouterr()
    generate(model, False)
    captured = capfd.readouterr()
    traced = [(int(rows), int(blocks)) for rows, blocks in re.findall(
        r"Decode step traced for (\d+) rows, (\d+) blocks read", captured.out + captured.err)]
    assert traced and len(traced) == len(set(traced)), traced
    assert {rows for rows, _ in traced} <= {1, 2, 4, 8}, traced
    assert all(blocks & (blocks - 1) == 0 for _, blocks in traced), traced
