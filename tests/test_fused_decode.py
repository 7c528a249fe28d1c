"""A decode step's whole attention as one kernel (``attention/fused_decode``).

Here, on any machine: its reference (MLX's own operations) is mlx-lm's attention
step: q/k norms, rotary embeddings, the KV write and attention over the context.
On MLX's CUDA build: the kernel against that reference, writing in place or
handing the keys and values back, at several head layouts, types and positions.
"""

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models import qwen3
from test_decode_kernel import random_case

from vllm_metal.attention import fused_decode
from vllm_metal.device import on_cuda

ON_CUDA = on_cuda()


def case(batch, heads, kv_heads, head_dim, dtype, seed=0, longest=150):
    """A pool and its rows as the decode kernel's tests make them, each request's
    position (its last), the rows it writes there, and a q/k/v projection output."""
    _, pool, read, positions = random_case(batch, heads, kv_heads, head_dim, dtype, seed=seed,
                                           longest=longest)
    own = np.concatenate([np.array(positions)] * 2)
    write = np.array(read)[np.arange(2 * batch), :, own][:, :, None]
    rng = np.random.default_rng(seed)
    qkv = mx.array(rng.standard_normal((batch, 1, (heads + 2 * kv_heads) * head_dim)), dtype=dtype)
    return qkv, pool, positions, mx.array(write.astype(np.int32)), read


def inverse_frequencies(head_dim, base=10000.0):
    return mx.array(base ** (-np.arange(0, head_dim, 2) / head_dim), dtype=mx.float32)


def test_reference_is_mlx_lms_attention_step():
    """Qwen3's attention module, on a KV cache holding the context, gives what the
    reference gives from the same projection output and pool."""
    args = qwen3.ModelArgs(model_type="qwen3", hidden_size=64, num_hidden_layers=1,
                           intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                           rms_norm_eps=1e-6, vocab_size=32, rope_theta=10000.0, head_dim=32,
                           tie_word_embeddings=True, max_position_embeddings=512)
    attention = qwen3.Attention(args)
    rng = np.random.default_rng(1)
    attention.q_norm.weight = mx.array(1 + rng.standard_normal(32) / 4, dtype=mx.float32)
    attention.k_norm.weight = mx.array(1 + rng.standard_normal(32) / 4, dtype=mx.float32)
    qkv, pool, positions, write, read = case(1, 4, 2, 32, mx.float32, seed=2)
    position = int(positions.item())

    class ContextCache:
        """mlx-lm's cache protocol over the pool's rows of this request's context."""
        offset = position

        def update_and_fetch(self, keys, values):
            context_keys, context_values = mx.split(pool[read], 2)
            return (mx.concatenate([context_keys[:, :, :position], keys], axis=2),
                    mx.concatenate([context_values[:, :, :position], values], axis=2))

    x = mx.array(rng.standard_normal((1, 1, 64)), dtype=mx.float32)
    weights = mx.concatenate([attention.q_proj.weight, attention.k_proj.weight,
                              attention.v_proj.weight])
    qkv = x @ weights.T
    want = attention(x, mask=None, cache=ContextCache())
    got, _, _ = fused_decode.reference(qkv, pool, positions, read, 4, 2, attention.scale,
                                       inverse_frequencies(32), False, attention.q_norm.weight,
                                       attention.k_norm.weight, 1e-6)
    assert mx.allclose(got @ attention.o_proj.weight.T, want, atol=1e-4).item()


@pytest.mark.skipif(not ON_CUDA, reason="the kernel runs on MLX's CUDA build")
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(16, 8, 128), (8, 8, 64), (32, 4, 128)])
@pytest.mark.parametrize("qk_norm, traditional", [(True, False), (False, True), (False, False)])
@pytest.mark.parametrize("write", [True, False], ids=["in-place", "handed-back"])
def test_kernel_matches_its_reference(dtype, heads, kv_heads, head_dim, qk_norm, traditional,
                                      write):
    qkv, pool, positions, write_rows, read_rows = case(3, heads, kv_heads, head_dim, dtype)
    rng = np.random.default_rng(5)
    norms = [mx.array(1 + rng.standard_normal(head_dim) / 4, dtype=dtype) for _ in range(2)]
    q_norm, k_norm = norms if qk_norm else (None, None)
    inv_freq = inverse_frequencies(head_dim)
    scale = head_dim ** -0.5
    want, want_keys, want_values = fused_decode.reference(
        qkv, pool, positions, read_rows, heads, kv_heads, scale, inv_freq, traditional, q_norm,
        k_norm, 1e-6)
    mx.eval(want, want_keys, want_values)
    result = fused_decode.fused_decode_attention(
        qkv, pool, positions, write_rows, read_rows, heads, kv_heads, scale, inv_freq,
        traditional, q_norm, k_norm, 1e-6, write=write)
    got = result if write else result[0]
    mx.eval(got)
    tolerance = 1e-4 if dtype == mx.float32 else 3e-2
    close = lambda a, b: mx.allclose(a.astype(mx.float32), b.astype(mx.float32),  # noqa: E731
                                     atol=tolerance, rtol=tolerance).item()
    assert close(got, want)
    if write:
        keys, values = mx.split(pool[write_rows], 2)
    else:
        keys, values = result[1], result[2]
    assert close(keys, want_keys) and close(values, want_values)


@pytest.mark.skipif(not ON_CUDA, reason="the kernel runs on MLX's CUDA build")
@pytest.mark.parametrize("warps", [8, 16, 32])
def test_more_warps_a_block_give_the_reference(warps):
    """A block of 8 to 32 warps (``warps``), each taking 32 positions a round: up to
    600 positions, several rounds at 8 warps, idle warps at 32; the merge of that
    many partial sums."""
    qkv, pool, positions, write_rows, read_rows = case(3, 16, 8, 128, mx.bfloat16, longest=600)
    inv_freq = inverse_frequencies(128)
    want, _, _ = fused_decode.reference(qkv, pool, positions, read_rows, 16, 8, 128 ** -0.5,
                                        inv_freq, False)
    mx.eval(want)
    got = fused_decode.fused_decode_attention(qkv, pool, positions, write_rows, read_rows, 16, 8,
                                              128 ** -0.5, inv_freq, False, warps=warps)
    assert mx.allclose(got.astype(mx.float32), want.astype(mx.float32), atol=3e-2,
                       rtol=3e-2).item()


@pytest.mark.parametrize("warps", [0, 33])
def test_warps_a_block_past_cudas_limit_are_refused(warps):
    qkv, pool, positions, write_rows, read_rows = case(1, 4, 2, 64, mx.float32)
    with pytest.raises(ValueError, match="CUDA blocks hold 1 to 32"):
        fused_decode.fused_decode_attention(qkv, pool, positions, write_rows, read_rows, 4, 2,
                                            0.125, inverse_frequencies(64), False, warps=warps)


def test_warps_follow_the_blocks_and_the_setting(monkeypatch):
    """32 warps where a step's blocks (batch x query heads) are few, 16 above;
    VLLM_METAL_ATTENTION_WARPS wins where set, and a bad value is refused."""
    monkeypatch.delenv("VLLM_METAL_ATTENTION_WARPS", raising=False)
    assert fused_decode.warps_for(1, 32) == 32 and fused_decode.warps_for(4, 16) == 32
    assert fused_decode.warps_for(8, 32) == 16 and fused_decode.warps_for(5, 16) == 16
    monkeypatch.setenv("VLLM_METAL_ATTENTION_WARPS", "8")
    assert fused_decode.warps_for(1, 32) == 8
    monkeypatch.setenv("VLLM_METAL_ATTENTION_WARPS", "64")
    with pytest.raises(ValueError, match="VLLM_METAL_ATTENTION_WARPS='64'"):
        fused_decode.warps_for(1, 32)
