"""A decoder layer's decode step in six kernels (``models/decode_block``).

Here, on any machine: the rotary module's angles are read off right (and refused
where the module is no plain rotation); the engine routes the compiled decode
steps of Llama, Qwen2 and Qwen3 layers to the fused step, and with the kernels'
references standing in for the kernels it gives the tokens it gives without the
route. On MLX's CUDA build the kernels are tested against those references
(``test_fused_decode``, ``test_gemv``), and the engine with the real kernels here.
"""

import mlx.core as mx
import mlx.nn as nn
import pytest
from conftest import engine_greedy_tokens, start_llm, stop_llm
from mlx_lm.models.rope_utils import initialize_rope
from vllm.inputs import TokensPrompt

from vllm_metal.attention import fused_decode
from vllm_metal.device import on_cuda
from vllm_metal.models import decode_block, gemv

ON_CUDA = on_cuda()
# The kernel takes head sizes in multiples of 32 (mlx-lm's Qwen2 derives it from the width).
MODELS = [("qwen3", {"head_dim": 32}), ("qwen2", {"hidden_size": 128, "head_dim": 32}),
          ("llama", {"head_dim": 32, "mlp_bias": True, "attention_bias": True})]


def prompts():
    return [TokensPrompt(prompt_token_ids=[(7 * j + 3 * i) % 300 + 3 for j in range(2 + 9 * i)])
            for i in range(4)]


def generate(model: str, **options) -> list[list[int]]:
    return engine_greedy_tokens(model, prompts(), [9 + 2 * i for i in range(4)],
                                max_num_batched_tokens=64, **options)


@pytest.mark.parametrize("rope, traditional", [
    (nn.RoPE(32, traditional=False, base=10000.0), False),
    (nn.RoPE(32, traditional=True, base=500000.0), True),
    (initialize_rope(32, 500000.0, False, {"rope_type": "llama3", "factor": 8.0,
                                           "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                           "original_max_position_embeddings": 8192}, 131072),
     False),
])
def test_rotary_frequencies_are_read_off_the_module(rope, traditional):
    inv_freq, found = decode_block.rotary_frequencies(rope, 32)
    assert found == traditional
    x = mx.random.normal((2, 3, 1, 32), key=mx.random.key(1))
    for position in (0, 5, 1000):
        want = rope(x, offset=position)
        got = fused_decode.rotate(x, mx.array([position, position]), inv_freq, traditional)
        assert mx.allclose(got, want, atol=1e-4).item()


def test_a_rotation_of_part_of_the_head_is_not_taken():
    assert decode_block.rotary_frequencies(nn.RoPE(16, base=10000.0), 32) is None


@pytest.mark.parametrize("arch, overrides", MODELS)
def test_fused_decode_steps_give_the_plain_tokens(arch, overrides, tiny_model, monkeypatch):
    """In this process (the stand-ins must be seen by the engine)."""
    model = tiny_model(arch, **overrides)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    monkeypatch.setenv("VLLM_METAL_KV_WRITE_IN_PLACE", "0")  # the stand-in hands keys back
    monkeypatch.setenv("VLLM_METAL_FUSED_DECODE_BLOCK", "0")
    plain = generate(model)
    monkeypatch.setenv("VLLM_METAL_FUSED_DECODE_BLOCK", "auto")
    calls = []

    def stand_in(qkv, pool, offsets, write_rows, read_rows, heads, kv_heads, scale, inv_freq,
                 traditional, q_norm=None, k_norm=None, eps=0.0, write=True, warps=None):
        assert not write, "off CUDA the pools are written by a scatter"
        calls.append((qkv.shape, q_norm is not None, warps == fused_decode.warps_for(len(qkv), heads)))
        return fused_decode.reference(qkv, pool, offsets, read_rows, heads, kv_heads, scale,
                                      inv_freq, traditional, q_norm, k_norm, eps)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(decode_block, "available", lambda: True)
        patch.setattr(fused_decode, "fused_decode_attention", stand_in)
        patch.setattr(decode_block, "swiglu", decode_block.reference_swiglu)
        fused = generate(model)
    assert fused == plain
    assert calls, "no decode step took the fused path"
    assert {with_norm for _, with_norm, _ in calls} == {arch == "qwen3"}
    assert all(warps_by_size for _, _, warps_by_size in calls)


def test_eager_steps_keep_mlx_lms_layers(tiny_model, monkeypatch):
    model = tiny_model("qwen3", head_dim=32)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    calls = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(decode_block, "available", lambda: True)
        patch.setattr(fused_decode, "fused_decode_attention",
                      lambda *args, **kwargs: calls.append(1))
        generate(model, enforce_eager=True)
    assert not calls


def test_forcing_it_on_a_model_it_does_not_cover_is_refused(tiny_model, monkeypatch):
    model = tiny_model("qwen3")  # head size 16: not a multiple of 32
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    monkeypatch.setenv("VLLM_METAL_FUSED_DECODE_BLOCK", "1")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(decode_block, "available", lambda: True)
        with pytest.raises(Exception, match="VLLM_METAL_FUSED_DECODE_BLOCK=1, but no decoder"):
            generate(model)


@pytest.mark.skipif(not ON_CUDA, reason="the kernels run on MLX's CUDA build")
@pytest.mark.parametrize("arch, overrides", MODELS)
@pytest.mark.parametrize("in_place", ["auto", "0"], ids=["in-place", "scatter"])
def test_engine_with_the_fused_kernels_gives_the_plain_tokens(arch, overrides, in_place,
                                                              tiny_model, monkeypatch):
    """``auto``: the default, writing in place where the layers are fused."""
    model = tiny_model(arch, **overrides)
    monkeypatch.setenv("VLLM_METAL_FUSED_DECODE_BLOCK", "0")
    monkeypatch.setenv("VLLM_METAL_KV_WRITE_IN_PLACE", "0")
    plain = generate(model)
    monkeypatch.setenv("VLLM_METAL_FUSED_DECODE_BLOCK", "1")
    monkeypatch.setenv("VLLM_METAL_KV_WRITE_IN_PLACE", in_place)
    assert generate(model) == plain


@pytest.mark.skipif(not ON_CUDA, reason="the kernels run on MLX's CUDA build")
def test_engine_with_tensor_core_projections_in_bf16(tiny_model, monkeypatch):
    """12 requests in bf16, decoded together (one batch size: one decode graph to trace):
    the fused steps' projections of 12 rows on tensor cores (VLLM_METAL_GEMV_TENSOR_CORES=1)
    against MLX's norm, matmul and add. Their bf16 roundings differ, so near-ties may part
    a few tokens; a wrong product parts most."""
    model = tiny_model("llama", head_dim=32, hidden_size=256, intermediate_size=512)
    requests = [TokensPrompt(prompt_token_ids=[(5 * j + 11 * i) % 300 + 3 for j in range(8)])
                for i in range(12)]

    def tokens(tensor_cores: str) -> list[list[int]]:
        monkeypatch.setenv("VLLM_METAL_GEMV_TENSOR_CORES", tensor_cores)
        llm = start_llm(model, dtype="bfloat16", max_num_batched_tokens=256,
                        enable_prefix_caching=False)
        try:
            params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
            return [list(o.outputs[0].token_ids) for o in llm.generate(requests, params)]
        finally:
            stop_llm(llm)

    plain, tensor = tokens("0"), tokens("1")
    same = sum(a == b for p, t in zip(plain, tensor) for a, b in zip(p, t))
    assert same >= 0.9 * sum(map(len, plain)), (plain, tensor)


def test_by_default_the_fused_step_runs_on_cuda_and_writes_in_place(monkeypatch):
    """The settings left out: the fused step and its in-place writes on MLX's CUDA
    build (where their tests above pass), neither elsewhere; mlx-lm's layers'
    steps keep the scatter."""
    from vllm_metal.attention import decode_kernel

    monkeypatch.delenv("VLLM_METAL_FUSED_DECODE_BLOCK", raising=False)
    monkeypatch.delenv("VLLM_METAL_KV_WRITE_IN_PLACE", raising=False)
    monkeypatch.delenv("VLLM_METAL_GEMV_TENSOR_CORES", raising=False)
    assert decode_block.available() == ON_CUDA
    assert gemv.tensor_cores() == ON_CUDA
    assert decode_kernel.writes_in_place(fused_blocks=True) == ON_CUDA
    assert not decode_kernel.writes_in_place(fused_blocks=False)
