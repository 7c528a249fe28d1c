"""Tensor and pipeline parallel on one host: N x M worker processes, the model's
collectives through mx.distributed (ring backend on 127.0.0.1), greedy tokens
identical to transformers' float32 ones (and so to one rank's)."""

import pytest
from vllm import SamplingParams
from vllm.inputs import TokensPrompt

from conftest import start_llm, stop_llm
from vllm_metal.testing.reference import greedy_tokens, load_hf
from vllm_metal.testing.tiny_models import SUPPORTED_TINY_ARCHS

PROMPTS = [
    "def add_one(x):",
    "The quick brown fox jumps over the lazy dog. " * 6,
    "a",
    "hello world " * 40,
]
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)

def prompts_and_tokens(model: str, **options) -> list[tuple[list[int], list[int]]]:
    llm = start_llm(model, **options)
    try:
        return [(list(o.prompt_token_ids), list(o.outputs[0].token_ids))
                for o in llm.generate(PROMPTS, GREEDY)]
    finally:
        stop_llm(llm)


def assert_matches_transformers(model: str, **layout) -> None:
    """The split model's greedy tokens are transformers' float32 ones, which are one
    rank's too (tests/test_parity.py holds one rank to the same reference)."""
    prompt_ids, got = zip(*prompts_and_tokens(model, **layout))
    hf = load_hf(model)
    assert list(got) == [greedy_tokens(hf, list(ids), GREEDY.max_tokens) for ids in prompt_ids]


def in_ci(archs: set[str], of: list[str]) -> list:
    """``of``, with the architectures outside ``archs`` marked slow (CI's time budget;
    ``-m slow`` runs them)."""
    return [a if a in archs else pytest.param(a, marks=pytest.mark.slow) for a in of]


@pytest.mark.parametrize("arch", in_ci({"llama", "phi3", "gemma2", "qwen3_moe"},
                                        SUPPORTED_TINY_ARCHS))
def test_tensor_parallel_2_matches_transformers(tiny_model, arch):
    assert_matches_transformers(tiny_model(arch), tensor_parallel_size=2)


# CI splits a dense model, one with fused projections, one with sliding windows and
# an MoE one over TP, and all but the fused one over PP (stages cut between whole
# layers, whatever the architecture).
@pytest.mark.parametrize("arch", in_ci({"llama", "gemma2", "qwen3_moe"}, SUPPORTED_TINY_ARCHS))
def test_pipeline_parallel_2_matches_transformers(tiny_model, arch):
    assert_matches_transformers(tiny_model(arch), pipeline_parallel_size=2)


# The tiny models have 2 KV heads; these get 4 (and 4 layers for two stages of two).
# One dense model with separate projections, one with fused ones, one MoE.
WIDER = ["llama", "phi3", "qwen3_moe"]


@pytest.mark.parametrize("arch", in_ci({"llama"}, WIDER))
def test_tensor_parallel_4_matches_transformers(tiny_model, arch):
    model = tiny_model(arch, num_key_value_heads=4, num_hidden_layers=4)
    assert_matches_transformers(model, tensor_parallel_size=4)


@pytest.mark.parametrize("arch", in_ci({"phi3"}, WIDER))
def test_tensor_2_by_pipeline_2_matches_transformers(tiny_model, arch):
    model = tiny_model(arch, num_key_value_heads=4, num_hidden_layers=4)
    assert_matches_transformers(model, tensor_parallel_size=2, pipeline_parallel_size=2)


SHARED_PREFIX = "Once upon a time in a land far away there lived a fox. " * 8
REPEATS = [TokensPrompt(prompt_token_ids=[7, 8, 9, 10, 11] * 12),
           TokensPrompt(prompt_token_ids=[40, 41, 42] * 20 + [5, 6])]
NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3,
         "prompt_lookup_min": 1}


@pytest.mark.parametrize("layout", [dict(tensor_parallel_size=2, speculative_config=NGRAM),
                                    pytest.param(dict(pipeline_parallel_size=2),
                                                 marks=pytest.mark.slow)])
def test_prefix_cache_and_ngram_speculation_stay_on(tiny_model, layout):
    """Cached prefixes are reused under TP and PP, n-gram drafts are verified under
    TP, and the tokens are still those of one rank without either."""
    model = tiny_model("qwen3")
    prompts = [SHARED_PREFIX + "The fox", SHARED_PREFIX + "The dog", *REPEATS]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    plain = start_llm(model, enable_prefix_caching=False)
    try:
        expected = [list(o.outputs[0].token_ids) for o in plain.generate(prompts, params)]
    finally:
        stop_llm(plain)
    llm = start_llm(model, disable_log_stats=False, **layout)
    try:
        first = llm.generate(prompts[:1], params)
        rest = llm.generate(prompts[1:], params)
        metrics = {m.name: m for m in llm.get_metrics()}
    finally:
        stop_llm(llm)
    got = [list(o.outputs[0].token_ids) for o in first + rest]
    assert got == expected
    assert rest[0].num_cached_tokens >= 64
    if "speculative_config" in layout:
        assert metrics["vllm:spec_decode_num_draft_tokens"].value > 0
