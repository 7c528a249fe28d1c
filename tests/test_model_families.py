"""DeepSeek-V3 (the architecture Kimi K2 checkpoints declare) and gpt-oss.

DeepSeek-V3: multi-head latent attention on the paged cache, routed plus shared
experts with group-limited routing, a dense first layer, with and without a
compressed query. gpt-oss: attention sinks, a sliding window on every other
layer (8 tokens here, so every prompt outgrows it), YaRN RoPE, biased experts.
Greedy tokens equal transformers' float32 ones alone, batched, and split over
TP=2 and PP=2; the latent cache holds one row per token."""

import pytest
from conftest import PARITY_PROMPTS, KV_BYTES, start_llm, stop_llm
from transformers import AutoTokenizer
from vllm import SamplingParams
from vllm.inputs import TokensPrompt

from vllm_metal.testing.reference import greedy_tokens, load_hf
from vllm_metal.testing.tiny_models import tiny_config_dict

PROMPTS = PARITY_PROMPTS
GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
BLOCK_SIZE = 16


def prompt_ids(model: str) -> list[list[int]]:
    tokenizer = AutoTokenizer.from_pretrained(model)
    return [tokenizer(p).input_ids for p in PROMPTS]


def reference(model: str, prompts: list[list[int]]) -> list[list[int]]:
    hf = load_hf(model)
    return [greedy_tokens(hf, ids, GREEDY.max_tokens) for ids in prompts]


def generate(llm, prompts: list[list[int]]) -> list[list[int]]:
    outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompts], GREEDY)
    return [list(o.outputs[0].token_ids) for o in outputs]


# DeepSeek-V3's and Kimi K2's YaRN (mscale on the attention scale), with an original
# length this short so that it changes the tiny model's rotary frequencies.
DEEPSEEK_YARN = {"rope_parameters": {"rope_type": "yarn", "factor": 40.0, "mscale": 1.0,
                                     "mscale_all_dim": 1.0, "original_max_position_embeddings": 64,
                                     "beta_fast": 32, "beta_slow": 1, "rope_theta": 10000.0},
                 "max_position_embeddings": 2560}


@pytest.mark.parametrize("arch,overrides", [
    ("deepseek_v3", {}),
    ("deepseek_v3", {"q_lora_rank": None}),
    ("deepseek_v3", DEEPSEEK_YARN),
    ("gpt_oss", {}),
], ids=["deepseek_v3-q_lora", "deepseek_v3-q_proj", "deepseek_v3-yarn", "gpt_oss"])
def test_greedy_matches_transformers_batched_and_alone(tiny_model, arch, overrides):
    model = tiny_model(arch, **overrides)
    prompts = prompt_ids(model)
    expected = reference(model, prompts)
    llm = start_llm(model)
    try:
        batched = generate(llm, prompts)
        alone = [generate(llm, [ids])[0] for ids in prompts]
    finally:
        stop_llm(llm)
    assert batched == expected
    assert alone == expected


@pytest.mark.parametrize("arch", ["deepseek_v3", "gpt_oss"])
@pytest.mark.parametrize("layout", [dict(tensor_parallel_size=2),
                                    dict(pipeline_parallel_size=2)], ids=["tp2", "pp2"])
def test_split_over_two_ranks_matches_transformers(tiny_model, arch, layout):
    model = tiny_model(arch)
    prompts = prompt_ids(model)
    llm = start_llm(model, **layout)
    try:
        got = generate(llm, prompts)
    finally:
        stop_llm(llm)
    assert got == reference(model, prompts)


def cache_blocks(model: str) -> int:
    llm = start_llm(model, enable_prefix_caching=False)
    try:
        return llm.llm_engine.vllm_config.cache_config.num_gpu_blocks
    finally:
        stop_llm(llm)


def test_latent_cache_holds_one_row_per_token_and_gets_more_blocks(tiny_model):
    """The same KV budget holds (kv_lora_rank + qk_rope_head_dim) values per token
    and layer for latent attention, 2 x kv_heads x head_dim for a standard model
    of the same width and depth."""
    latent = tiny_config_dict("deepseek_v3")
    layers = latent["num_hidden_layers"]
    standard = tiny_model("qwen3", num_hidden_layers=layers)
    standard_config = tiny_config_dict("qwen3")
    latent_values = latent["kv_lora_rank"] + latent["qk_rope_head_dim"]
    standard_values = 2 * standard_config["num_key_value_heads"] * standard_config["head_dim"]
    assert latent_values < standard_values

    latent_blocks = cache_blocks(tiny_model("deepseek_v3"))
    standard_blocks = cache_blocks(standard)
    float32 = 4
    assert latent_blocks == KV_BYTES // (BLOCK_SIZE * layers * latent_values * float32)
    assert standard_blocks == KV_BYTES // (BLOCK_SIZE * layers * standard_values * float32)
    assert latent_blocks / standard_blocks == pytest.approx(standard_values / latent_values,
                                                            rel=0.01)


def test_a_kimi_k2_checkpoint_runs_as_deepseek_v3(tiny_model, tmp_path):
    """Kimi K2 checkpoints declare DeepseekV3ForCausalLM with model_type kimi_k2 (which
    vLLM reads as DeepSeek-V3's config; transformers has no class for it)."""
    import json
    import shutil

    deepseek = tiny_model("deepseek_v3")
    kimi = tmp_path / "kimi-k2"
    shutil.copytree(deepseek, kimi)
    config = json.loads((kimi / "config.json").read_text())
    (kimi / "config.json").write_text(json.dumps({**config, "model_type": "kimi_k2"}))
    prompts = prompt_ids(deepseek)
    expected = reference(deepseek, prompts)
    # vLLM reads kimi_k2 by setting DeepseekV3Config.model_type for the whole process;
    # later tests write and read DeepSeek-V3 configs.
    from transformers import DeepseekV3Config

    model_type = DeepseekV3Config.model_type
    llm = start_llm(str(kimi))
    try:
        got = generate(llm, prompts)
    finally:
        stop_llm(llm)
        DeepseekV3Config.model_type = model_type
    assert got == expected


def test_deepseek_without_latent_attention_is_refused(tiny_model, monkeypatch):
    monkeypatch.setenv("VLLM_MLA_DISABLE", "1")
    with pytest.raises(Exception, match="DeepseekV3ForCausalLM without latent attention"):
        start_llm(tiny_model("deepseek_v3"))
