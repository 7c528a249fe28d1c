"""Decode attention straight from the paged pools (``attention/decode_kernel``).

Here, on any machine: the engine routes single-query steps to the kernel's entry
point with the right rows, positions, windows and sinks. With the plain-MLX
specification standing in for the kernel the engine gives the tokens it gives
without the route. On MLX's CUDA build: the kernel itself against that
specification, on ragged contexts, grouped heads, windows, sinks and dtypes.
"""

import contextlib
import sys

import mlx.core as mx
import numpy as np
import pytest
from conftest import engine_greedy_tokens
from vllm.inputs import TokensPrompt

from vllm_metal.attention import decode_kernel
from vllm_metal.device import on_cuda

ON_CUDA = on_cuda()


@pytest.fixture(autouse=True)
def layers_of_mlx_lm(monkeypatch):
    """These engine tests are about mlx-lm's layers with the kernel routed in; on
    CUDA the fused decode step (``test_decode_block``) would take their place."""
    monkeypatch.setenv("VLLM_METAL_FUSED_DECODE_BLOCK", "0")


def prompts():
    return [TokensPrompt(prompt_token_ids=[(13 * j + 7 * i) % 400 + 3 for j in range(3 + 11 * i)])
            for i in range(5)]


def generate(model: str, enforce_eager: bool) -> list[list[int]]:
    return engine_greedy_tokens(model, prompts(), [12 + 3 * i for i in range(5)],
                                enforce_eager=enforce_eager, max_num_batched_tokens=64)


@contextlib.contextmanager
def routed_to_specification():
    """The engine's decode attention routed to the kernel's entry point, which the
    specification stands in for; yields the windows of its calls."""
    calls = []

    def stand_in(*args, **kwargs):
        calls.append(kwargs.get("window", args[5] if len(args) > 5 else None))
        return decode_kernel.reference_decode_attention(*args, **kwargs)

    before = {name: module.scaled_dot_product_attention for name, module in sys.modules.items()
              if name.startswith("mlx_lm.models.")
              and hasattr(module, "scaled_dot_product_attention")}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(decode_kernel, "available", lambda: True)
        patch.setattr(decode_kernel, "paged_decode_attention", stand_in)
        try:
            yield calls
        finally:
            base = sys.modules["mlx_lm.models.base"].scaled_dot_product_attention
            for name, module in list(sys.modules.items()):
                if name.startswith("mlx_lm.models.") and \
                        hasattr(module, "scaled_dot_product_attention"):
                    module.scaled_dot_product_attention = before.get(name, base)


# The kernel takes head sizes in multiples of 32 (the tiny models' default is 16).
@pytest.mark.parametrize("arch, overrides, windows", [
    ("qwen3", {"head_dim": 32}, {None}),
    ("gemma3_text", {"head_dim": 32, "sliding_window": 8}, {None, 8}),  # windowed and global
    ("gpt_oss", {"head_dim": 32}, None),  # attention sinks
])
@pytest.mark.parametrize("enforce_eager", [False, True], ids=["compiled", "eager"])
def test_routed_decode_gives_the_plain_tokens(arch, overrides, windows, enforce_eager,
                                              tiny_model, monkeypatch):
    """In this process (the stand-in must be seen by the engine)."""
    model = tiny_model(arch, **overrides)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    plain = generate(model, enforce_eager)
    with routed_to_specification() as calls:
        routed = generate(model, enforce_eager)
    assert routed == plain
    assert calls, "no decode step went to the kernel's entry point"
    if windows is not None:
        assert set(calls) == windows


def random_case(B, heads, kv_heads, head_dim, dtype, block_size=16, seed=0, longest=70):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, longest, size=B)
    blocks_each = -(-lengths.max() // block_size)
    num_blocks = 1 + B * blocks_each
    pool = mx.array(rng.standard_normal((num_blocks * 2 * kv_heads * block_size, head_dim)),
                    dtype=dtype)
    tables = 1 + rng.permutation(B * blocks_each).reshape(B, blocks_each)
    first = (tables[:, None, :] * 2 * kv_heads + np.arange(kv_heads)[None, :, None]) * block_size
    first = np.concatenate([first, first + kv_heads * block_size])
    rows = (first[..., None] + np.arange(block_size)).reshape(2 * B, kv_heads, -1)
    queries = mx.array(rng.standard_normal((B, heads, 1, head_dim)), dtype=dtype)
    offsets = mx.array(lengths - 1, dtype=mx.int32)
    return queries, pool, mx.array(rows.astype(np.int32)), offsets


@pytest.mark.skipif(not ON_CUDA, reason="the kernel runs on MLX's CUDA build")
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(16, 8, 128), (32, 8, 128), (8, 8, 64),
                                                       (64, 8, 64)])
@pytest.mark.parametrize("window, with_sinks", [(None, False), (7, False), (None, True)])
@pytest.mark.parametrize("key_per_lane", [False, True], ids=["key-per-warp", "key-per-lane"])
def test_kernel_matches_the_specification(dtype, heads, kv_heads, head_dim, window, with_sinks,
                                          key_per_lane):
    # Up to 300 keys: several rounds of 32 keys for each of a block's warps.
    queries, pool, rows, offsets = random_case(5, heads, kv_heads, head_dim, dtype, longest=300)
    sinks = mx.linspace(-1, 2, heads).astype(dtype) if with_sinks else None
    scale = head_dim ** -0.5
    got = decode_kernel.paged_decode_attention(queries, pool, rows, offsets, scale, window, sinks,
                                               key_per_lane=key_per_lane)
    want = decode_kernel.reference_decode_attention(queries, pool, rows, offsets, scale, window,
                                                    sinks)
    tolerance = 1e-5 if dtype == mx.float32 else 2e-2
    assert mx.allclose(got.astype(mx.float32), want.astype(mx.float32), atol=tolerance,
                       rtol=tolerance).item()


@pytest.mark.skipif(not ON_CUDA, reason="the kernel runs on MLX's CUDA build")
def test_kernel_reads_rows_through_their_strides():
    """An eager step's rows are a slice of its blocks' rows, up to the longest
    context: a view whose rows are not packed."""
    queries, pool, rows, offsets = random_case(5, 16, 8, 128, mx.bfloat16, seed=4)
    longest = int(mx.max(offsets).item()) + 1
    sliced = rows[..., :longest]
    assert longest < rows.shape[-1]
    got = decode_kernel.paged_decode_attention(queries, pool, sliced, offsets, 0.1)
    assert mx.allclose(got.astype(mx.float32), decode_kernel.paged_decode_attention(
        queries, pool, sliced, offsets, 0.1, key_per_lane=True).astype(mx.float32),
        atol=2e-2, rtol=2e-2).item()
    want = decode_kernel.reference_decode_attention(queries, pool, sliced, offsets, 0.1)
    assert mx.allclose(got.astype(mx.float32), want.astype(mx.float32), atol=2e-2,
                       rtol=2e-2).item()


@pytest.mark.skipif(not ON_CUDA, reason="the kernel runs on MLX's CUDA build")
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("entries", [2, 1], ids=["keys-and-values", "latent-rows"])
def test_write_in_place_updates_the_pools_own_buffer(dtype, entries):
    rng = np.random.default_rng(3)
    B, H, L, D = 3, 2, 2, 32
    pool = mx.zeros((64 * 4, D), dtype=dtype)
    mx.eval(pool)
    rows = mx.array(rng.permutation(64 * 4)[:entries * B * H * L]
                    .reshape(entries * B, H, L).astype(np.int32))
    keys = mx.array(rng.standard_normal((B, H, L, D)), dtype=dtype)
    # Values as mlx-lm hands them over: a transposed view, not packed.
    values = mx.array(rng.standard_normal((B, L, H, D)), dtype=dtype).transpose(0, 2, 1, 3)
    written = decode_kernel.write_in_place(pool, rows, keys, values if entries == 2 else None)
    fresh = mx.concatenate([keys, values]) if entries == 2 else keys
    read = pool[rows + written]
    mx.eval(read)
    assert written.item() == 0
    assert mx.array_equal(read, fresh).item()
    # The array the caller holds is the same buffer, now written.
    assert mx.array_equal(pool[rows], fresh).item()
    untouched = np.setdiff1d(np.arange(64 * 4), np.array(rows).ravel())
    assert not mx.any(pool[mx.array(untouched)]).item()


@pytest.mark.skipif(not ON_CUDA, reason="the kernels run on MLX's CUDA build")
@pytest.mark.parametrize("arch, overrides", [("qwen3", {"head_dim": 32}),
                                             ("gemma3_text", {"head_dim": 32, "sliding_window": 8})])
@pytest.mark.parametrize("attention_kernel", ["auto", "0"], ids=["kernel", "gather"])
def test_engine_writing_in_place_gives_the_plain_tokens(arch, overrides, attention_kernel,
                                                        tiny_model, monkeypatch):
    """Compiled decode steps writing the pools in place, issued before the step in
    flight ends, mixed with prefill chunks that scatter; read back by the attention
    kernel or by a gather: the tokens of the plain path."""
    model = tiny_model(arch, **overrides)
    monkeypatch.setenv("VLLM_METAL_KV_WRITE_IN_PLACE", "1")
    monkeypatch.setenv("VLLM_METAL_PAGED_ATTENTION_KERNEL", attention_kernel)
    in_place = generate(model, enforce_eager=False)
    monkeypatch.setenv("VLLM_METAL_KV_WRITE_IN_PLACE", "0")
    monkeypatch.setenv("VLLM_METAL_PAGED_ATTENTION_KERNEL", "0")
    plain = generate(model, enforce_eager=False)
    assert in_place == plain
