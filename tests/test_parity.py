"""Greedy parity with transformers float32, for every supported architecture,
several prompts of different lengths submitted together."""

import pytest
from conftest import start_llm, stop_llm
from transformers import AutoTokenizer
from vllm import SamplingParams
from vllm.inputs import TokensPrompt

from vllm_metal.testing.reference import greedy_tokens, load_hf

ARCHS = ["llama", "qwen2", "qwen3", "mistral", "phi3", "gemma2", "gemma3_text", "mixtral",
         "qwen3_moe"]
PROMPTS = [
    "Hello",
    "The quick brown fox jumps over the lazy dog",
    "Once upon a time there was a small village by the sea, and every morning the "
    "fishermen went out before dawn to bring back their catch for the market.",
    " ".join(f"word{i}" for i in range(120)),
]
NEW_TOKENS = 16


def engine_and_reference(model_dir: str, prompts: list[str]):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt_ids = [tokenizer(p).input_ids for p in prompts]
    hf = load_hf(model_dir)
    expected = [greedy_tokens(hf, ids, NEW_TOKENS) for ids in prompt_ids]
    llm = start_llm(model_dir)
    try:
        outputs = llm.generate(
            [TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids],
            SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True),
        )
    finally:
        stop_llm(llm)
    return prompt_ids, [list(o.outputs[0].token_ids) for o in outputs], expected


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_matches_transformers(arch, tiny_model):
    prompt_ids, got, expected = engine_and_reference(tiny_model(arch), PROMPTS)
    assert len({len(ids) for ids in prompt_ids}) == len(PROMPTS)
    assert got == expected


@pytest.mark.parametrize("arch", ["mistral", "gemma3_text"])
def test_sliding_window_matches_transformers(arch, tiny_model):
    """Prompts longer than a small window: keys outside it must be masked."""
    prompt_ids, got, expected = engine_and_reference(tiny_model(arch, sliding_window=24),
                                                     PROMPTS[2:])
    assert all(len(ids) > 24 for ids in prompt_ids)
    assert got == expected
