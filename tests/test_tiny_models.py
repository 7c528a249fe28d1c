import json

import mlx.core as mx
import pytest
import torch
import transformers
from mlx_lm.models.cache import make_prompt_cache
from pathlib import Path

from mlx_lm.utils import load_model, load_tokenizer
from safetensors import safe_open

from vllm_metal.testing.tiny_models import (
    CHATML_TEMPLATE,
    SUPPORTED_TINY_ARCHS,
    TOKENIZER_VOCAB_SIZE,
    main,
    write_tiny_model,
)

PROMPTS = [
    "Hello",
    "The quick brown fox jumps over the lazy dog.",
    'Anna said: "I think the garden is quiet, but the river is not." Then Ben '
    "wrote a long letter to his friend in Tokyo about the weather and the trains.",
]
NUM_TOKENS = 16


def mlx_load(path: str):
    """The model definition the plugin runs (mlx-lm's, or the plugin's correction of
    it: models/registry.py), with mlx-lm's tokenizer and KV cache."""
    from vllm_metal.models.loader import _classes_by_architecture

    model, _ = load_model(Path(path), get_model_classes=_classes_by_architecture)
    return model, load_tokenizer(Path(path))


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {arch: write_tiny_model(arch, root / arch) for arch in SUPPORTED_TINY_ARCHS}


def hf_greedy(model, prompt_ids, num_tokens=NUM_TOKENS):
    tokens, past, inputs = [], None, torch.tensor([prompt_ids])
    with torch.no_grad():
        for _ in range(num_tokens):
            out = model(input_ids=inputs, past_key_values=past, use_cache=True)
            past = out.past_key_values
            tokens.append(int(out.logits[0, -1].argmax()))
            inputs = torch.tensor([[tokens[-1]]])
    return tokens


def mlx_greedy(model, prompt_ids, num_tokens=NUM_TOKENS):
    cache = make_prompt_cache(model)
    logits = model(mx.array([prompt_ids]), cache=cache)
    tokens = []
    for _ in range(num_tokens):
        tokens.append(mx.argmax(logits[0, -1]).item())
        logits = model(mx.array([[tokens[-1]]]), cache=cache)
    return tokens


def load_hf(path):
    # eager: transformers' sdpa path drops Gemma 2's attention softcapping.
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager"
    )
    return model.eval(), transformers.AutoTokenizer.from_pretrained(path)


@pytest.mark.parametrize("arch", SUPPORTED_TINY_ARCHS)
def test_greedy_parity_transformers_vs_mlx_lm(tiny_dirs, arch):
    hf_model, hf_tokenizer = load_hf(tiny_dirs[arch])
    mlx_model, mlx_tokenizer = mlx_load(str(tiny_dirs[arch]))
    assert hf_model.config.model_type == arch

    generations = []
    for prompt in PROMPTS:
        prompt_ids = hf_tokenizer.encode(prompt)
        assert mlx_tokenizer.encode(prompt) == prompt_ids
        expected = hf_greedy(hf_model, prompt_ids)
        assert mlx_greedy(mlx_model, prompt_ids) == expected, prompt
        generations.append(expected)

    assert len({tuple(g) for g in generations}) == len(PROMPTS)
    assert all(len(set(g)) > 2 for g in generations), generations


def test_config_shape(tiny_dirs):
    config = json.loads((tiny_dirs["llama"] / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["hidden_size"], config["num_hidden_layers"]) == (64, 2)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (4, 2)
    assert (config["head_dim"], config["intermediate_size"]) == (16, 128)
    assert config["vocab_size"] == TOKENIZER_VOCAB_SIZE
    assert config["max_position_embeddings"] == 4096
    assert config["tie_word_embeddings"] is False
    generation = json.loads((tiny_dirs["llama"] / "generation_config.json").read_text())
    assert generation["eos_token_id"] == config["eos_token_id"] == 0


def test_tied_embeddings_override(tmp_path):
    path = write_tiny_model("qwen3", tmp_path, tie_word_embeddings=True)
    with safe_open(path / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys()
    hf_model, _ = load_hf(path)
    mlx_model, _ = mlx_load(str(path))
    prompt_ids = [5, 6, 7, 8]
    assert mlx_greedy(mlx_model, prompt_ids, 4) == hf_greedy(hf_model, prompt_ids, 4)


def test_tokenizer(tiny_dirs):
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_dirs["qwen3"])
    assert tokenizer.is_fast
    assert len(tokenizer) == TOKENIZER_VOCAB_SIZE
    assert tokenizer.bos_token is None
    assert tokenizer.eos_token == tokenizer.pad_token == "<|endoftext|>"
    for text in [PROMPTS[2], "Héllo wörld! 你好 🙂\n\tdef f(x):\n    return x  ", ""]:
        assert tokenizer.decode(tokenizer.encode(text)) == text
    no_bos = tokenizer.encode("The cat", add_special_tokens=False)
    assert tokenizer("The cat")["input_ids"] == no_bos
    assert tokenizer.chat_template == CHATML_TEMPLATE

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = tokenizer.encode(text)
    im_start, im_end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert ids.count(im_start) == 3 and ids.count(im_end) == 2


def test_same_seed_same_bytes(tmp_path):
    a = write_tiny_model("mixtral", tmp_path / "a", seed=3)
    b = write_tiny_model("mixtral", tmp_path / "b", seed=3)
    c = write_tiny_model("mixtral", tmp_path / "c", seed=4)
    for name in ["model.safetensors", "config.json", "tokenizer.json"]:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


def test_bfloat16_and_cli(tmp_path):
    main(["--arch", "qwen2", "--out", str(tmp_path), "--dtype", "bfloat16"])
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    mlx_model, _ = mlx_load(str(tmp_path))
    assert len(mlx_greedy(mlx_model, [5, 6, 7], 2)) == 2


def test_unknown_arch_and_wrong_preset(tmp_path):
    with pytest.raises(ValueError, match="unknown arch"):
        write_tiny_model("gpt9", tmp_path)
    with pytest.raises(ValueError, match="qwen3"):
        write_tiny_model("llama", tmp_path, preset="qwen3-0.6b")


QWEN3_0_6B_SHAPES = {
    "model.embed_tokens.weight": [151936, 1024],
    "model.norm.weight": [1024],
    "model.layers.0.input_layernorm.weight": [1024],
    "model.layers.0.post_attention_layernorm.weight": [1024],
    "model.layers.0.self_attn.q_proj.weight": [2048, 1024],
    "model.layers.0.self_attn.k_proj.weight": [1024, 1024],
    "model.layers.0.self_attn.v_proj.weight": [1024, 1024],
    "model.layers.0.self_attn.o_proj.weight": [1024, 2048],
    "model.layers.0.self_attn.q_norm.weight": [128],
    "model.layers.0.self_attn.k_norm.weight": [128],
    "model.layers.0.mlp.gate_proj.weight": [3072, 1024],
    "model.layers.0.mlp.up_proj.weight": [3072, 1024],
    "model.layers.0.mlp.down_proj.weight": [1024, 3072],
}


def test_qwen3_0_6b_preset_one_layer(tmp_path):
    path = write_tiny_model(
        "qwen3", tmp_path, preset="qwen3-0.6b", dtype="bfloat16", num_hidden_layers=1
    )
    with safe_open(path / "model.safetensors", "pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
        assert f.get_tensor("model.norm.weight").eq(1).all()
    assert shapes == QWEN3_0_6B_SHAPES
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForCausalLM"]
    assert config["tie_word_embeddings"] is True
    assert config["rope_theta"] == 1000000.0
    assert transformers.AutoTokenizer.from_pretrained(path).eos_token_id == 0


@pytest.mark.slow
def test_qwen3_0_6b_preset_loads_in_mlx_lm(tmp_path, request):
    if "slow" not in request.config.getoption("markexpr"):
        pytest.skip("writes 1.2 GB; run with -m slow")
    path = write_tiny_model("qwen3", tmp_path, preset="qwen3-0.6b", dtype="bfloat16")
    mlx_model, _ = mlx_load(str(path))
    assert len(mlx_model.layers) == 28
    assert mlx_model.model.embed_tokens.weight.shape == (151936, 1024)
    assert mlx_model.model.embed_tokens.weight.dtype == mx.bfloat16
