"""Greedy parity with transformers float32, for every supported architecture,
several prompts of different lengths submitted together."""

import pytest
from conftest import PARITY_PROMPTS, start_llm, stop_llm
from transformers import AutoTokenizer
from vllm import SamplingParams
from vllm.inputs import TokensPrompt

from vllm_metal.testing.reference import greedy_tokens, load_hf

ARCHS = ["llama", "qwen2", "qwen3", "mistral", "phi3", "gemma2", "gemma3_text", "mixtral",
         "qwen3_moe"]
PROMPTS = PARITY_PROMPTS
NEW_TOKENS = 16


def engine_and_reference(model_dir: str, prompts: list[str], new_tokens: int = NEW_TOKENS,
                         **engine_options):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt_ids = [tokenizer(p).input_ids for p in prompts]
    hf = load_hf(model_dir)
    expected = [greedy_tokens(hf, ids, new_tokens) for ids in prompt_ids]
    llm = start_llm(model_dir, **engine_options)
    try:
        outputs = llm.generate(
            [TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids],
            SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True),
        )
    finally:
        stop_llm(llm)
    return prompt_ids, [list(o.outputs[0].token_ids) for o in outputs], expected


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_matches_transformers(arch, tiny_model):
    prompt_ids, got, expected = engine_and_reference(tiny_model(arch), PROMPTS)
    assert len({len(ids) for ids in prompt_ids}) == len(PROMPTS)
    assert got == expected


WINDOW = 8
# Config overrides that give each windowed architecture a window of WINDOW tokens.
# Gemma alternates sliding and full layers on its own; Qwen2/Qwen3 window the
# layers from max_window_layers on.
SLIDING_WINDOW_CONFIGS = {
    "mistral": dict(sliding_window=WINDOW),
    "phi3": dict(sliding_window=WINDOW),
    "mixtral": dict(sliding_window=WINDOW),
    "qwen3_moe": dict(use_sliding_window=True, sliding_window=WINDOW),
    "qwen2": dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=0),
    "qwen3": dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=0),
    "gemma2": dict(sliding_window=WINDOW),
    "gemma3_text": dict(sliding_window=WINDOW),
}
# Configs whose layers differ: some windowed, some full.
MIXED_WINDOW_CONFIGS = {
    "qwen2": dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1,
                  num_hidden_layers=3),
    "qwen3": dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=2,
                  num_hidden_layers=3),
    "gemma2": dict(sliding_window=WINDOW, num_hidden_layers=3),
    "gemma3_text": dict(sliding_window=WINDOW, sliding_window_pattern=3, num_hidden_layers=3),
}
WINDOW_NEW_TOKENS = 24


def assert_window_exceeded(prompt_ids):
    assert all(len(ids) + WINDOW_NEW_TOKENS > 2 * WINDOW for ids in prompt_ids)
    assert any(len(ids) > 4 * WINDOW for ids in prompt_ids)


@pytest.mark.parametrize("arch", sorted(SLIDING_WINDOW_CONFIGS))
def test_sliding_window_matches_transformers(arch, tiny_model):
    """Prompts and generations longer than a small window, submitted together:
    keys outside each layer's window must be masked, in prefill and decode."""
    model_dir = tiny_model(arch, **SLIDING_WINDOW_CONFIGS[arch])
    prompt_ids, got, expected = engine_and_reference(model_dir, PROMPTS, WINDOW_NEW_TOKENS)
    assert_window_exceeded(prompt_ids)
    assert got == expected


@pytest.mark.parametrize("arch", sorted(MIXED_WINDOW_CONFIGS))
def test_per_layer_windows_match_transformers(arch, tiny_model):
    model_dir = tiny_model(arch, **MIXED_WINDOW_CONFIGS[arch])
    prompt_ids, got, expected = engine_and_reference(model_dir, PROMPTS, WINDOW_NEW_TOKENS)
    assert_window_exceeded(prompt_ids)
    assert got == expected


def test_sliding_window_in_chunked_prefill(tiny_model):
    """Prompt chunks that start past the window still see only the window."""
    model_dir = tiny_model("phi3", **SLIDING_WINDOW_CONFIGS["phi3"])
    prompt_ids, got, expected = engine_and_reference(
        model_dir, PROMPTS[2:], WINDOW_NEW_TOKENS, max_num_batched_tokens=32, max_num_seqs=4,
        enable_chunked_prefill=True)
    assert any(len(ids) > 32 for ids in prompt_ids)
    assert got == expected
