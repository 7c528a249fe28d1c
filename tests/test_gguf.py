"""GGUF loading: parity with transformers on the bundled SmolLM2 file, plus
synthetic files for the tensor types and errors the bundled file lacks."""

import gguf
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as GGMLType
from mlx.utils import tree_flatten
from mlx_lm.models.cache import make_prompt_cache

from vllm_metal.models.gguf import (
    bundled_smollm2_path,
    load_gguf_model,
    resolve_gguf_file,
)

PROMPTS = [
    "Once upon a time, there was a little",
    "The capital of France is",
    "def fibonacci(n):",
]
NEW_TOKENS = 8


def mlx_greedy(model, prompt_ids, max_tokens, stop_token=None):
    cache = make_prompt_cache(model)
    logits = model(mx.array([prompt_ids]), cache=cache)
    tokens = []
    for _ in range(max_tokens):
        token = mx.argmax(logits[0, -1]).item()
        tokens.append(token)
        if token == stop_token:
            break
        logits = model(mx.array([[token]]), cache=cache)
    return tokens


@torch.inference_mode()
def hf_greedy(model, prompt_ids, max_tokens):
    out = model(torch.tensor([prompt_ids]), use_cache=True)
    tokens = []
    for _ in range(max_tokens):
        token = int(out.logits[0, -1].argmax())
        tokens.append(token)
        out = model(
            torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True
        )
    return tokens


# ------------------------------------------------------- bundled SmolLM2


@pytest.fixture(scope="module")
def smollm2():
    return bundled_smollm2_path()


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2.parent, gguf_file=smollm2.name)


@pytest.fixture(scope="module")
def hf_reference(smollm2, tokenizer):
    """transformers' float32 config and greedy tokens, per prompt."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        smollm2.parent, gguf_file=smollm2.name, dtype=torch.float32
    )
    greedy = {p: hf_greedy(model, tokenizer(p).input_ids, NEW_TOKENS) for p in PROMPTS}
    return model.config, greedy


@pytest.fixture(scope="module")
def dense(smollm2):
    return load_gguf_model(smollm2, dequantize=True)


@pytest.fixture(scope="module")
def quantized(smollm2):
    return load_gguf_model(smollm2, dequantize=False)


def test_config_matches_transformers(dense, hf_reference):
    _, config = dense
    hf_config, _ = hf_reference
    assert config["model_type"] == "llama"
    assert config["tie_word_embeddings"] is True
    for key in [
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "intermediate_size",
        "vocab_size",
        "rope_theta",
        "max_position_embeddings",
        "bos_token_id",
        "eos_token_id",
    ]:
        hf_value = getattr(hf_config, key, None)
        if key == "rope_theta" and hf_value is None:
            hf_value = hf_config.rope_parameters["rope_theta"]
        assert config[key] == hf_value, key
    assert config["rms_norm_eps"] == pytest.approx(hf_config.rms_norm_eps)


def test_dense_weights(dense):
    model, _ = dense
    dtypes = {w.dtype for _, w in tree_flatten(model.parameters())}
    assert dtypes == {mx.float32}
    assert type(model.model.embed_tokens) is nn.Embedding


def test_quantized_layers_keep_gguf_bits(quantized):
    model, _ = quantized
    embed = model.model.embed_tokens
    q_proj = model.layers[0].self_attn.q_proj
    assert isinstance(embed, nn.QuantizedEmbedding)
    assert (embed.bits, embed.group_size) == (8, 32)  # Q8_0
    assert isinstance(q_proj, nn.QuantizedLinear)
    assert (q_proj.bits, q_proj.group_size) == (4, 32)  # Q4_1


@pytest.mark.parametrize("prompt", PROMPTS)
def test_dense_greedy_matches_transformers(dense, tokenizer, hf_reference, prompt):
    model, _ = dense
    _, expected = hf_reference
    tokens = mlx_greedy(model, tokenizer(prompt).input_ids, NEW_TOKENS)
    assert tokens == expected[prompt]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_quantized_greedy_matches_transformers(
    quantized, tokenizer, hf_reference, prompt
):
    model, _ = quantized
    _, expected = hf_reference
    tokens = mlx_greedy(model, tokenizer(prompt).input_ids, NEW_TOKENS)
    assert tokens == expected[prompt]


@pytest.mark.parametrize("variant", ["dense", "quantized"])
def test_chat_answer_names_paris(request, tokenizer, variant):
    model, config = request.getfixturevalue(variant)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    prompt_ids = tokenizer(text).input_ids
    answer = mlx_greedy(model, prompt_ids, 16, stop_token=config["eos_token_id"])
    assert "Paris" in tokenizer.decode(answer, skip_special_tokens=True)


def test_resolve_gguf_file(tmp_path, smollm2):
    assert resolve_gguf_file(str(smollm2)) == smollm2
    assert resolve_gguf_file(str(smollm2.parent)) == smollm2

    (tmp_path / "config.json").write_text("{}")
    assert resolve_gguf_file(str(tmp_path)) is None
    assert resolve_gguf_file(str(tmp_path / "config.json")) is None
    assert resolve_gguf_file(str(tmp_path / "missing.gguf")) is None
    assert resolve_gguf_file("HuggingFaceTB/SmolLM2-135M-Instruct") is None

    first = tmp_path / "a.gguf"
    first.write_bytes(b"GGUF")
    assert resolve_gguf_file(str(tmp_path)) == first
    (tmp_path / "b.gguf").write_bytes(b"GGUF")
    assert resolve_gguf_file(str(tmp_path)) is None


# ------------------------------------------------------ synthetic GGUFs

TINY = dict(hidden=64, heads=4, kv_heads=2, ffn=128, vocab=96, layers=2)

# One tensor of each supported type, in the roles where llama.cpp puts them.
TINY_TYPES = {
    "token_embd": GGMLType.Q8_0,
    "output": GGMLType.Q4_0,
    "attn_q": GGMLType.Q4_0,
    "attn_k": GGMLType.Q4_1,
    "attn_v": GGMLType.F16,
    "attn_output": GGMLType.Q8_0,
    "ffn_gate": GGMLType.Q4_1,
    "ffn_up": GGMLType.Q4_0,
    "ffn_down": GGMLType.F32,
}

MLX_LM_NAMES = {
    "token_embd": "model.embed_tokens",
    "output": "lm_head",
    "output_norm": "model.norm",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def llama_cpp_permute(rows: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of Q/K rows."""
    return (
        rows.reshape(heads, 2, rows.shape[0] // heads // 2, *rows.shape[1:])
        .swapaxes(1, 2)
        .reshape(rows.shape)
    )


def tiny_shapes():
    h, kv_dim = TINY["hidden"], TINY["hidden"] // TINY["heads"] * TINY["kv_heads"]
    shapes = {
        "token_embd": (TINY["vocab"], h),
        "output": (TINY["vocab"], h),
        "output_norm": (h,),
    }
    block = {
        "attn_norm": (h,),
        "ffn_norm": (h,),
        "attn_q": (h, h),
        "attn_k": (kv_dim, h),
        "attn_v": (kv_dim, h),
        "attn_output": (h, h),
        "ffn_gate": (TINY["ffn"], h),
        "ffn_up": (TINY["ffn"], h),
        "ffn_down": (h, TINY["ffn"]),
    }
    for i in range(TINY["layers"]):
        shapes.update({f"blk.{i}.{name}": shape for name, shape in block.items()})
    return shapes


def write_tiny_gguf(path, arch="llama", types=TINY_TYPES):
    """Writes a tiny random llama GGUF; returns the HF-order dequantized weights."""
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(TINY["layers"])
    writer.add_embedding_length(TINY["hidden"])
    writer.add_feed_forward_length(TINY["ffn"])
    writer.add_head_count(TINY["heads"])
    writer.add_head_count_kv(TINY["kv_heads"])
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(10000.0)
    writer.add_context_length(256)
    writer.add_vocab_size(TINY["vocab"])
    expected = {}
    for name, shape in tiny_shapes().items():
        role = name.split(".")[-1]
        kind = types.get(role, GGMLType.F32)
        values = rng.standard_normal(shape).astype(np.float32) * 0.2
        if role.endswith("norm"):
            values += 1.0
        heads = {"attn_q": TINY["heads"], "attn_k": TINY["kv_heads"]}.get(role)
        if kind in (GGMLType.F32, GGMLType.F16):
            stored = values.astype(np.float16 if kind == GGMLType.F16 else np.float32)
            writer.add_tensor(f"{name}.weight", stored)
            dequantized = stored.astype(np.float32)
        elif kind in (GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q8_0):
            stored = gguf.quants.quantize(values, kind)
            writer.add_tensor(f"{name}.weight", stored, raw_dtype=kind)
            dequantized = gguf.quants.dequantize(stored, kind)
        else:  # types gguf-py cannot quantize: zero bytes of the right size
            block, size = gguf.GGML_QUANT_SIZES[kind]
            stored = np.zeros((shape[0], shape[1] // block * size), np.uint8)
            writer.add_tensor(f"{name}.weight", stored, raw_dtype=kind)
            dequantized = None
        if heads and dequantized is not None:
            order = llama_cpp_permute(np.arange(shape[0]), heads)
            dequantized = dequantized[np.argsort(order)]
        expected[name] = dequantized
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


def mlx_lm_name(gguf_name):
    parts = gguf_name.split(".")
    if parts[0] != "blk":
        return f"{MLX_LM_NAMES[gguf_name]}.weight"
    return f"model.layers.{parts[1]}.{MLX_LM_NAMES[parts[2]]}.weight"


def test_tiny_dense_weights_match_gguf_py(tmp_path):
    expected = write_tiny_gguf(tmp_path / "tiny.gguf")
    model, config = load_gguf_model(tmp_path / "tiny.gguf", dequantize=True)
    params = dict(tree_flatten(model.parameters()))
    assert config["tie_word_embeddings"] is False
    assert len(params) == len(expected)
    for name, values in expected.items():
        np.testing.assert_allclose(
            np.array(params[mlx_lm_name(name)]), values, rtol=0, atol=1e-6, err_msg=name
        )


def test_tiny_quantized_matches_dense(tmp_path):
    write_tiny_gguf(tmp_path / "tiny.gguf")
    dense_model, _ = load_gguf_model(tmp_path / "tiny.gguf", dequantize=True)
    model, _ = load_gguf_model(tmp_path / "tiny.gguf", dequantize=False)
    attention = model.layers[0].self_attn
    assert model.model.embed_tokens.bits == 8
    assert model.lm_head.bits == 4
    assert (attention.q_proj.bits, attention.k_proj.bits, attention.o_proj.bits) == (
        4,
        4,
        8,
    )
    assert type(attention.v_proj) is nn.Linear  # F16 stays dense
    tokens = mx.array([[3, 14, 15, 92, 65]])
    np.testing.assert_allclose(
        np.array(model(tokens)), np.array(dense_model(tokens)), atol=1e-4
    )


def test_unsupported_architecture_is_refused(tmp_path):
    write_tiny_gguf(tmp_path / "tiny.gguf", arch="mamba")
    with pytest.raises(ValueError, match="'mamba'.*supported: llama"):
        load_gguf_model(tmp_path / "tiny.gguf", dequantize=True)


# mx.load silently turns BF16 (and K-quants) into float16 and fails on Q5_0.
@pytest.mark.parametrize(
    "kind", [GGMLType.BF16, GGMLType.Q5_0], ids=lambda kind: kind.name
)
def test_unsupported_tensor_type_is_refused(tmp_path, kind):
    write_tiny_gguf(tmp_path / "tiny.gguf", types={**TINY_TYPES, "ffn_down": kind})
    supported = "supported: F32, F16, Q4_0, Q4_1, Q8_0"
    with pytest.raises(ValueError, match=f"{kind.name}.*{supported}"):
        load_gguf_model(tmp_path / "tiny.gguf", dequantize=False)
