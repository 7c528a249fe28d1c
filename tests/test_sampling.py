"""Sampling goes through vLLM's own sampler with vLLM's semantics: seeds,
logprobs, prompt logprobs, n > 1, penalties, biases, allowed tokens, stops."""

import math

import pytest
import torch
from conftest import start_llm, stop_llm
from vllm import SamplingParams
from vllm.inputs import TokensPrompt

from vllm_metal.testing.reference import load_hf, logprobs as reference_logprobs

PROMPT = TokensPrompt(prompt_token_ids=[5, 17, 42, 99, 123, 7, 300, 11, 64, 250])


@pytest.fixture(scope="module")
def llm(tiny_model):
    engine = start_llm(tiny_model("qwen3"))
    yield engine
    stop_llm(engine)


def generate(llm, prompt=PROMPT, **params):
    return llm.generate([prompt], SamplingParams(**params))[0]


def tokens(output, i=0) -> list[int]:
    return list(output.outputs[i].token_ids)


def test_same_seed_same_text_different_seeds_differ(llm):
    params = dict(temperature=1.0, max_tokens=16, ignore_eos=True)
    a = tokens(generate(llm, seed=7, **params))
    b = tokens(generate(llm, seed=7, **params))
    others = {tuple(tokens(generate(llm, seed=s, **params))) for s in (1, 2, 3)}
    assert a == b
    assert len(others | {tuple(a)}) >= 3


def test_seeded_request_is_reproducible_inside_a_batch(llm):
    params = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True, seed=11)
    alone = tokens(llm.generate([PROMPT], params)[0])
    noise = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)
    batch = llm.generate([TokensPrompt(prompt_token_ids=[9] * 40), PROMPT, PROMPT],
                         [noise, params, noise])
    assert tokens(batch[1]) == alone


def test_logprobs_equal_reference_log_softmax(llm, tiny_model):
    out = generate(llm, temperature=0.0, max_tokens=6, logprobs=5, prompt_logprobs=3,
                   ignore_eos=True)
    generated = tokens(out)
    ref = reference_logprobs(load_hf(tiny_model("qwen3")),
                             PROMPT["prompt_token_ids"] + generated)
    n_prompt = len(PROMPT["prompt_token_ids"])
    for step, (token, step_logprobs) in enumerate(zip(generated, out.outputs[0].logprobs)):
        row = ref[n_prompt - 1 + step]
        assert token == int(row.argmax())
        assert len(step_logprobs) >= 5
        for token_id, lp in step_logprobs.items():
            assert abs(lp.logprob - float(row[token_id])) < 1e-3
        top5 = set(torch.topk(row, 5).indices.tolist())
        assert top5 <= set(step_logprobs)

    assert out.prompt_logprobs[0] is None
    for pos, entry in enumerate(out.prompt_logprobs[1:], start=1):
        token_id = PROMPT["prompt_token_ids"][pos]
        assert abs(entry[token_id].logprob - float(ref[pos - 1, token_id])) < 1e-3


def test_n_returns_that_many_completions(llm):
    out = generate(llm, n=3, temperature=1.0, max_tokens=10, ignore_eos=True, seed=3)
    assert len(out.outputs) == 3
    assert len({tuple(tokens(out, i)) for i in range(3)}) > 1


def test_allowed_token_ids_and_logit_bias(llm):
    allowed = [10, 20, 30]
    out = generate(llm, temperature=1.0, max_tokens=12, ignore_eos=True, seed=1,
                   allowed_token_ids=allowed)
    assert set(tokens(out)) <= set(allowed)
    biased = generate(llm, temperature=0.0, max_tokens=5, ignore_eos=True,
                      logit_bias={77: 100.0})
    assert tokens(biased) == [77] * 5


def test_penalties_change_greedy_output(llm):
    plain = tokens(generate(llm, temperature=0.0, max_tokens=24, ignore_eos=True))
    penalized = tokens(generate(llm, temperature=0.0, max_tokens=24, ignore_eos=True,
                                repetition_penalty=2.0, presence_penalty=1.5,
                                frequency_penalty=1.0))
    assert penalized != plain
    assert len(set(penalized)) >= len(set(plain))


def test_top_k_one_and_min_p_one_are_greedy(llm):
    greedy = tokens(generate(llm, temperature=0.0, max_tokens=10, ignore_eos=True))
    assert tokens(generate(llm, temperature=1.5, top_k=1, max_tokens=10, ignore_eos=True,
                           seed=5)) == greedy
    assert tokens(generate(llm, temperature=1.5, min_p=1.0, max_tokens=10, ignore_eos=True,
                           seed=5)) == greedy
    assert tokens(generate(llm, temperature=1.5, top_p=1e-6, max_tokens=10, ignore_eos=True,
                           seed=5)) == greedy


def test_stop_tokens_stop_strings_and_min_tokens(llm):
    greedy = tokens(generate(llm, temperature=0.0, max_tokens=12, ignore_eos=True))
    stop_at = greedy[4]
    first = greedy.index(stop_at)
    stopped = generate(llm, temperature=0.0, max_tokens=12, stop_token_ids=[stop_at])
    assert tokens(stopped) == greedy[: first + 1]
    assert stopped.outputs[0].finish_reason == "stop"

    text = generate(llm, temperature=0.0, max_tokens=12, ignore_eos=True).outputs[0].text
    needle = text[len(text) // 2 : len(text) // 2 + 2]
    cut = generate(llm, temperature=0.0, max_tokens=12, ignore_eos=True, stop=[needle])
    assert cut.outputs[0].text == text[: text.index(needle)]

    kept = generate(llm, temperature=0.0, max_tokens=12, min_tokens=8,
                    stop_token_ids=[stop_at])
    assert len(tokens(kept)) >= 8


def test_max_tokens_and_length_finish(llm):
    out = generate(llm, temperature=0.0, max_tokens=7, ignore_eos=True)
    assert len(tokens(out)) == 7
    assert out.outputs[0].finish_reason == "length"
    assert math.isfinite(out.outputs[0].cumulative_logprob or 0.0)
