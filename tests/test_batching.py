"""Continuous batching, queueing and chunked prefill give the same greedy tokens
as each request run alone; prefix caching hits and changes nothing."""

import random

import pytest
from conftest import start_llm, stop_llm
from vllm import SamplingParams
from vllm.inputs import TokensPrompt

from vllm_metal.testing.reference import greedy_tokens, load_hf

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


def random_prompt(rng: random.Random, length: int) -> TokensPrompt:
    return TokensPrompt(prompt_token_ids=[rng.randrange(3, 500) for _ in range(length)])


def token_ids(outputs) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in outputs]


@pytest.fixture(scope="module")
def queued_llm(tiny_model):
    llm = start_llm(tiny_model("qwen3"), max_num_seqs=8, max_num_batched_tokens=256,
                    enable_prefix_caching=False)
    yield llm
    stop_llm(llm)


def test_32_requests_queued_and_chunked_match_each_alone(queued_llm, tiny_model):
    rng = random.Random(0)
    lengths = [1, 600] + [rng.randrange(1, 601) for _ in range(30)]
    prompts = [random_prompt(rng, n) for n in lengths]

    together = token_ids(queued_llm.generate(prompts, GREEDY))
    alone = [token_ids(queued_llm.generate([p], GREEDY))[0] for p in prompts]

    assert together == alone
    assert all(len(ids) == GREEDY.max_tokens for ids in together)
    # Alone is chunked too (600 > 256 tokens a step): check some against transformers.
    hf = load_hf(tiny_model("qwen3"))
    for prompt, got in list(zip(prompts, together))[:4]:
        assert got == greedy_tokens(hf, prompt["prompt_token_ids"], GREEDY.max_tokens)


def test_prefix_cache_hit_gives_same_tokens(tiny_model):
    rng = random.Random(1)
    prefix = [rng.randrange(3, 500) for _ in range(256)]
    first = TokensPrompt(prompt_token_ids=prefix + [rng.randrange(3, 500) for _ in range(20)])
    second = TokensPrompt(prompt_token_ids=prefix + [rng.randrange(3, 500) for _ in range(30)])

    results = {}
    for caching in (True, False):
        llm = start_llm(tiny_model("qwen3"), enable_prefix_caching=caching)
        try:
            llm.generate([first], GREEDY)
            (out,) = llm.generate([second], GREEDY)
        finally:
            stop_llm(llm)
        results[caching] = (list(out.outputs[0].token_ids), out.num_cached_tokens)

    (cached_ids, hits), (plain_ids, no_hits) = results[True], results[False]
    assert hits >= 256
    assert not no_hits
    assert cached_ids == plain_ids
