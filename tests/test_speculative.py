"""n-gram speculative decoding: drafts are verified in one forward; greedy output
is identical with and without it, and vLLM's metrics count accepted drafts; a
seeded sampled request is sampled exactly: the same tokens as without drafts."""

from conftest import start_llm, stop_llm
from vllm import SamplingParams
from vllm.inputs import TokensPrompt

NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 2,
         "prompt_lookup_max": 4}
# Repetitive prompts: the n-gram proposer finds matches in them.
PROMPTS = [TokensPrompt(prompt_token_ids=[7, 8, 9, 10, 11] * 12),
           TokensPrompt(prompt_token_ids=[40, 41, 42] * 20 + [5, 6]),
           TokensPrompt(prompt_token_ids=list(range(30, 60)))]


def run(model, speculative_config=None, **params):
    llm = start_llm(model, speculative_config=speculative_config, disable_log_stats=False)
    try:
        outs = llm.generate(PROMPTS, SamplingParams(max_tokens=24, ignore_eos=True, **params))
        metrics = {m.name: m for m in llm.get_metrics()}
    finally:
        stop_llm(llm)
    return [list(o.outputs[0].token_ids) for o in outs], metrics


def counter(metrics, name) -> float:
    metric = metrics.get(name)
    return metric.value if metric is not None else 0.0


def test_greedy_identical_with_and_without_ngram(tiny_model):
    model = tiny_model("qwen3")
    plain, _ = run(model, temperature=0.0)
    spec, metrics = run(model, NGRAM, temperature=0.0)
    assert spec == plain
    drafted = counter(metrics, "vllm:spec_decode_num_draft_tokens")
    accepted = counter(metrics, "vllm:spec_decode_num_accepted_tokens")
    assert drafted > 0
    assert 0 < accepted <= drafted


def test_seeded_sampled_requests_equal_their_output_without_ngram(tiny_model):
    model = tiny_model("qwen3")
    # A low temperature keeps the sampled text repetitive enough to draft from.
    plain, _ = run(model, temperature=0.5, seed=4)
    spec, metrics = run(model, NGRAM, temperature=0.5, seed=4)
    assert spec == plain
    assert all(len(ids) == 24 for ids in spec)
    assert counter(metrics, "vllm:spec_decode_num_draft_tokens") > 0


def test_drafts_alongside_a_grammar(tiny_model):
    """A grammar-constrained request in a batch with drafts (its own and others'):
    the grammar still holds and the greedy request's tokens do not change."""
    from vllm.sampling_params import StructuredOutputsParams

    model = tiny_model("qwen3")
    plain, _ = run(model, temperature=0.0)
    llm = start_llm(model, speculative_config=NGRAM, structured_outputs_config={
        "backend": "guidance", "disable_any_whitespace": True})
    try:
        greedy = SamplingParams(max_tokens=24, ignore_eos=True, temperature=0.0)
        constrained = SamplingParams(max_tokens=16, temperature=0.0, structured_outputs=
                                     StructuredOutputsParams(regex="(ab){2,6}c"))
        outs = llm.generate(PROMPTS + PROMPTS[:2], [greedy] * 3 + [constrained] * 2)
    finally:
        stop_llm(llm)
    assert [list(o.outputs[0].token_ids) for o in outs[:3]] == plain
    import re

    for out in outs[3:]:
        assert re.fullmatch("(ab){2,6}c", out.outputs[0].text), out.outputs[0].text
