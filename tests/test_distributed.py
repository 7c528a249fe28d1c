"""Tensor and pipeline parallel on one host: N x M worker processes, the model's
collectives through mx.distributed (ring backend on 127.0.0.1), greedy tokens
identical to one rank's in float32, and for some architectures to transformers'."""

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

# A dense and an MoE architecture whose TP=2 and PP=2 tokens are also checked
# against transformers float32, not only against the plugin's own one rank.
CHECKED_WITH_TRANSFORMERS = {"llama", "qwen3_moe"}

_reference: dict = {}


def generate(model: str, **options) -> list[list[int]]:
    return [tokens for _, tokens in prompts_and_tokens(model, **options)]


def prompts_and_tokens(model: str, **options) -> list[tuple[list[int], list[int]]]:
    llm = start_llm(model, **options)
    try:
        return [(list(o.prompt_token_ids), list(o.outputs[0].token_ids))
                for o in llm.generate(PROMPTS, GREEDY)]
    finally:
        stop_llm(llm)


def one_rank_tokens(model: str) -> list[list[int]]:
    if model not in _reference:
        _reference[model] = generate(model)
    return _reference[model]


def transformers_tokens(model: str, prompt_ids: list[list[int]]) -> list[list[int]]:
    hf = load_hf(model)
    return [greedy_tokens(hf, ids, GREEDY.max_tokens) for ids in prompt_ids]


def assert_matches_one_rank_and_transformers(arch: str, model: str, **layout) -> None:
    prompt_ids, got = zip(*prompts_and_tokens(model, **layout))
    assert list(got) == one_rank_tokens(model)
    if arch in CHECKED_WITH_TRANSFORMERS:
        assert list(got) == transformers_tokens(model, list(prompt_ids))


@pytest.mark.parametrize("arch", SUPPORTED_TINY_ARCHS)
def test_tensor_parallel_2_matches_one_rank(tiny_model, arch):
    assert_matches_one_rank_and_transformers(arch, tiny_model(arch), tensor_parallel_size=2)


@pytest.mark.parametrize("arch", SUPPORTED_TINY_ARCHS)
def test_pipeline_parallel_2_matches_one_rank(tiny_model, arch):
    assert_matches_one_rank_and_transformers(arch, tiny_model(arch), pipeline_parallel_size=2)


# The tiny models have 2 KV heads; these get 4 (and 4 layers for two stages of two).
# One dense model with separate projections, one with fused ones, one MoE.
WIDER = ["llama", "phi3", "qwen3_moe"]


@pytest.mark.parametrize("arch", WIDER)
def test_tensor_parallel_4_matches_one_rank(tiny_model, arch):
    model = tiny_model(arch, num_key_value_heads=4, num_hidden_layers=4)
    assert generate(model, tensor_parallel_size=4) == one_rank_tokens(model)


@pytest.mark.parametrize("arch", WIDER)
def test_tensor_2_by_pipeline_2_matches_one_rank(tiny_model, arch):
    model = tiny_model(arch, num_key_value_heads=4, num_hidden_layers=4)
    assert generate(model, tensor_parallel_size=2, pipeline_parallel_size=2) == one_rank_tokens(model)


SHARED_PREFIX = "Once upon a time in a land far away there lived a fox. " * 8
REPEATS = [TokensPrompt(prompt_token_ids=[7, 8, 9, 10, 11] * 12),
           TokensPrompt(prompt_token_ids=[40, 41, 42] * 20 + [5, 6])]
NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3,
         "prompt_lookup_min": 1}


@pytest.mark.parametrize("layout", [dict(tensor_parallel_size=2, speculative_config=NGRAM),
                                    dict(pipeline_parallel_size=2)])
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
