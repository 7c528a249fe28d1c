"""Sampling goes through vLLM's own sampler with vLLM's semantics: seeds,
logprobs, prompt logprobs, n > 1, penalties, biases, allowed tokens, stops."""

from collections import Counter

import pytest
import torch
from conftest import start_llm, stop_llm
from vllm import SamplingParams
from vllm.inputs import TokensPrompt

from vllm_metal.testing.reference import load_hf
from vllm_metal.testing.reference import logits as reference_logits
from vllm_metal.testing.reference import logprobs as reference_logprobs

PROMPT = TokensPrompt(prompt_token_ids=[5, 17, 42, 99, 123, 7, 300, 11, 64, 250])
PROMPT_IDS = PROMPT["prompt_token_ids"]


@pytest.fixture(scope="module")
def llm(tiny_model):
    # Processed logprobs, all of the vocabulary on request: after bias and penalties,
    # so their effect can be read back. A greedy request without either gets the
    # same numbers as vLLM's raw mode.
    engine = start_llm(tiny_model("qwen3"), logprobs_mode="processed_logprobs",
                       max_logprobs=-1)
    yield engine
    stop_llm(engine)


@pytest.fixture(scope="module")
def reference(tiny_model):
    return load_hf(tiny_model("qwen3"))


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


def test_logprobs_equal_reference_log_softmax(llm, reference):
    out = generate(llm, temperature=0.0, max_tokens=6, logprobs=5, prompt_logprobs=3,
                   ignore_eos=True)
    generated = tokens(out)
    ref = reference_logprobs(reference, PROMPT["prompt_token_ids"] + generated)
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


def test_allowed_token_ids_and_a_large_logit_bias(llm):
    allowed = [10, 20, 30]
    out = generate(llm, temperature=1.0, max_tokens=12, ignore_eos=True, seed=1,
                   allowed_token_ids=allowed)
    assert set(tokens(out)) <= set(allowed)
    biased = generate(llm, temperature=0.0, max_tokens=5, ignore_eos=True,
                      logit_bias={77: 100.0})
    assert tokens(biased) == [77] * 5


# vLLM's formulas (vllm/model_executor/layers/utils.py, apply_penalties), written
# out here: each takes one position's raw logits and the tokens so far.
def repetition(logits, prompt, output, penalty):
    seen = sorted(set(prompt) | set(output))
    out = logits.clone()
    out[seen] = torch.where(out[seen] > 0, out[seen] / penalty, out[seen] * penalty)
    return out, set(seen)


def frequency(logits, prompt, output, penalty):
    out = logits.clone()
    for token, count in Counter(output).items():
        out[token] -= penalty * count
    return out, set(output)


def presence(logits, prompt, output, penalty):
    out = logits.clone()
    out[sorted(set(output))] -= penalty
    return out, set(output)


def bias(logits, prompt, output, biases):
    out = logits.clone()
    for token, value in biases.items():
        out[token] += value
    return out, set(biases)


@pytest.mark.parametrize("param,value,formula,direction", [
    ("repetition_penalty", 2.0, repetition, -1),
    ("frequency_penalty", 1.0, frequency, -1),
    ("presence_penalty", 1.5, presence, -1),
    ("logit_bias", {77: 3.0, 300: 2.0}, bias, +1),
])
def test_each_penalty_alone_moves_its_tokens_by_vllms_formula(llm, reference, param, value,
                                                               formula, direction):
    """Greedy with one penalty: each step's logprobs over the whole vocabulary equal
    the log-softmax of transformers' logits after vLLM's formula, and the penalized
    (or biased) tokens move down (up) against the rest."""
    out = generate(llm, temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=-1,
                   **{param: value})
    generated = tokens(out)
    raw = reference_logits(reference, PROMPT_IDS + generated)
    moved = 0
    for step, returned in enumerate(out.outputs[0].logprobs):
        row = raw[len(PROMPT_IDS) - 1 + step]
        changed, hit = formula(row, PROMPT_IDS, generated[:step], value)
        expected = torch.log_softmax(changed, dim=-1)
        assert generated[step] == int(expected.argmax())
        assert len(returned) == len(row)
        for token, lp in returned.items():
            assert abs(lp.logprob - float(expected[token])) < 1e-3, (step, token)
        moved += count_moved(returned, torch.log_softmax(row, dim=-1), hit, direction)
    assert moved > 0


def count_moved(returned, plain, hit, direction) -> int:
    """How many tokens in ``hit`` moved in ``direction`` against the tokens
    outside it (which all shift by the same normalizer); none moved the other way."""
    shift = {token: lp.logprob - float(plain[token]) for token, lp in returned.items()}
    others = [shift[t] for t in shift if t not in hit]
    assert others, "every returned token is affected"
    baseline = max(others) if direction < 0 else min(others)
    moved = [t for t in shift if t in hit and direction * (shift[t] - baseline) > 1e-2]
    assert all(direction * (shift[t] - baseline) > -1e-3 for t in shift if t in hit)
    return len(moved)


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

    kept = tokens(generate(llm, temperature=0.0, max_tokens=12, min_tokens=8,
                           stop_token_ids=[stop_at]))
    assert len(kept) >= 8 and stop_at not in kept[:8]


def test_max_tokens_length_finish_and_cumulative_logprob(llm, reference):
    out = generate(llm, temperature=0.0, max_tokens=7, ignore_eos=True, logprobs=0)
    generated = tokens(out)
    assert len(generated) == 7
    assert out.outputs[0].finish_reason == "length"
    chosen = [step[token].logprob for token, step in zip(generated, out.outputs[0].logprobs)]
    ref = reference_logprobs(reference, PROMPT_IDS + generated)
    expected = sum(float(ref[len(PROMPT_IDS) - 1 + i, t]) for i, t in enumerate(generated))
    assert out.outputs[0].cumulative_logprob == pytest.approx(sum(chosen), abs=1e-4)
    assert out.outputs[0].cumulative_logprob == pytest.approx(expected, abs=5e-3)
