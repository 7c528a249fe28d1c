"""Few-row linear layers as one kernel (``models/gemv``).

Here, on any machine: the engine sends decode steps' projections and output head
(tied or not, with biases or without) to the kernel's entry point, and prefill's
many rows to MLX's matmul; with a plain product standing in for the kernel the
engine gives the tokens it gives without the route. On MLX's CUDA build: the
kernel itself against MLX's matmul, at every row count it takes, in each float
type, with and without a bias.
"""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import engine_greedy_tokens
from vllm.inputs import TokensPrompt

from vllm_metal.device import on_cuda
from vllm_metal.models import gemv

ON_CUDA = on_cuda()


@pytest.fixture(autouse=True)
def layers_of_mlx_lm(monkeypatch):
    """These engine tests are about mlx-lm's layers with the kernel routed in; on
    CUDA the fused decode step (``test_decode_block``) would take their place."""
    monkeypatch.setenv("VLLM_METAL_FUSED_DECODE_BLOCK", "0")


def plain_product(x, weight, bias=None):
    out = x @ weight.T
    return out if bias is None else out + bias


def generate(model: str, enforce_eager: bool) -> list[list[int]]:
    prompts = [TokensPrompt(prompt_token_ids=[(11 * j + 5 * i) % 300 + 3 for j in range(4 + 9 * i)])
               for i in range(4)]
    return engine_greedy_tokens(model, prompts, [10 + 2 * i for i in range(4)],
                                enforce_eager=enforce_eager, max_num_batched_tokens=64)


@pytest.mark.parametrize("arch, overrides", [
    ("qwen3", {"tie_word_embeddings": True}),
    ("qwen2", {"tie_word_embeddings": False}),  # projections with biases, an untied head
])
@pytest.mark.parametrize("enforce_eager", [False, True], ids=["compiled", "eager"])
def test_routed_linears_give_the_plain_tokens(arch, overrides, enforce_eager, tiny_model,
                                              monkeypatch):
    """In this process (the stand-in must be seen by the engine)."""
    model = tiny_model(arch, **overrides)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    plain = generate(model, enforce_eager)
    calls = []

    def stand_in(x, weight, bias=None):
        calls.append((x.size // x.shape[-1], tuple(weight.shape), bias is not None))
        return plain_product(x, weight, bias)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gemv, "available", lambda: True)
        patch.setattr(gemv, "small_batch_linear", stand_in)
        routed = generate(model, enforce_eager)
    assert routed == plain
    assert calls, "no decode step went to the kernel's entry point"
    assert max(rows for rows, _, _ in calls) <= gemv.MAX_ROWS
    shapes = {shape for _, shape, _ in calls}
    vocab_rows = {shape for shape in shapes if shape[0] >= 300}
    assert vocab_rows, "the output head did not take the kernel"
    if arch == "qwen2":
        assert any(has_bias for _, _, has_bias in calls)


def test_startup_launches_each_row_count_the_kernels_compile_for(tiny_model, monkeypatch):
    """Before any request: a prompt forward at each row count that is a kernel variant of
    its own (compiled at its first launch on CUDA), through the kernels' entry point.
    Off CUDA no tensor-core rows (16, 32); with no weight the kernels take, none at all."""
    from conftest import start_llm, stop_llm

    model = tiny_model("qwen3", tie_word_embeddings=True)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    calls = []

    def stand_in(x, weight, bias=None):
        calls.append(x.size // x.shape[-1])
        return plain_product(x, weight, bias)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gemv, "available", lambda: True)
        patch.setattr(gemv, "small_batch_linear", stand_in)
        stop_llm(start_llm(model, enforce_eager=True))  # started, then stopped: no request
        assert set(calls) == set(range(1, gemv.MAX_ROWS + 1)), sorted(set(calls))
        calls.clear()
        patch.setattr(gemv, "LARGE_WEIGHT", 1)  # every weight MLX's matmul's
        stop_llm(start_llm(model, enforce_eager=True))
    assert not calls


def test_route_leaves_quantized_layers_and_the_parameter_tree(monkeypatch):
    monkeypatch.setattr(gemv, "available", lambda: True)
    model = nn.Sequential(nn.Linear(16, 32), nn.Embedding(10, 16), nn.Linear(32, 8))
    model.layers[2] = nn.QuantizedLinear.from_linear(nn.Linear(64, 32))
    before = dict(nn.utils.tree_flatten(model.parameters()))
    assert gemv.route_linears(model) == 2
    assert [type(layer) for layer in model.layers] == [
        gemv.SmallBatchLinear, gemv.SmallBatchEmbedding, nn.QuantizedLinear]
    after = dict(nn.utils.tree_flatten(model.parameters()))
    assert before.keys() == after.keys()
    assert all(after[k] is before[k] for k in before)


def test_tensor_cores_asked_for_where_they_cannot_run_stop_startup(monkeypatch):
    monkeypatch.setenv("VLLM_METAL_GEMV_TENSOR_CORES", "1")
    model = nn.Sequential(nn.Linear(16, 32))
    if not ON_CUDA:
        with pytest.raises(RuntimeError, match="VLLM_METAL_GEMV_TENSOR_CORES=1 needs MLX's CUDA"):
            gemv.route_linears(model)
    monkeypatch.setenv("VLLM_METAL_GEMV_KERNEL", "0")
    with pytest.raises(RuntimeError, match="VLLM_METAL_GEMV_TENSOR_CORES=1"):
        gemv.route_linears(model)


def test_tensor_cores_need_compute_capability_8(monkeypatch):
    """Their bf16 mma does not exist before the A100: auto leaves them off there, 1 is refused."""
    monkeypatch.setattr(gemv, "cuda_feature", lambda setting, choice: choice != "0")
    monkeypatch.setattr(gemv, "_compute_capability", lambda: 7)
    monkeypatch.setenv("VLLM_METAL_GEMV_TENSOR_CORES", "auto")
    assert not gemv.tensor_cores()
    monkeypatch.setenv("VLLM_METAL_GEMV_TENSOR_CORES", "1")
    with pytest.raises(RuntimeError, match="compute capability 8.0 or later; this one is 7.x"):
        gemv.tensor_cores()
    monkeypatch.setattr(gemv, "_compute_capability", lambda: 9)
    assert gemv.tensor_cores()


def test_covers_few_rows_of_the_weight_type_only(monkeypatch):
    monkeypatch.setattr(gemv, "tensor_cores", lambda: False)
    weight = mx.zeros((24, 64), mx.bfloat16)
    assert gemv.covers(mx.zeros((1, 1, 64), mx.bfloat16), weight)
    assert gemv.covers(mx.zeros((gemv.MAX_ROWS, 1, 64), mx.bfloat16), weight)
    assert not gemv.covers(mx.zeros((gemv.MAX_ROWS + 1, 1, 64), mx.bfloat16), weight)
    assert not gemv.covers(mx.zeros((1, 64), mx.float32), weight)
    assert not gemv.covers(mx.zeros((1, 60), mx.bfloat16), mx.zeros((24, 60), mx.bfloat16))
    # A weight as large as LARGE_WEIGHT: MLX's matmul at any rows; one row less, the kernel.
    large = mx.zeros((gemv.LARGE_WEIGHT // 2 // 2048, 2048), mx.bfloat16)
    below = mx.zeros((gemv.LARGE_WEIGHT // 2 // 2048 - 1, 2048), mx.bfloat16)
    for rows in (1, 2, gemv.MAX_ROWS):
        assert not gemv.covers(mx.zeros((rows, 2048), mx.bfloat16), large)
        assert gemv.covers(mx.zeros((rows, 2048), mx.bfloat16), below)


def test_tensor_cores_cover_more_rows_in_half_precision(monkeypatch):
    monkeypatch.setattr(gemv, "tensor_cores", lambda: True)
    weight = mx.zeros((24, 64), mx.bfloat16)
    assert gemv.covers(mx.zeros((gemv.TENSOR_MAX_ROWS, 1, 64), mx.bfloat16), weight)
    assert not gemv.covers(mx.zeros((gemv.TENSOR_MAX_ROWS + 1, 64), mx.bfloat16), weight)
    assert not gemv.covers(mx.zeros((9, 64), mx.float32), mx.zeros((24, 64), mx.float32))
    # Widths the tensor-core kernel's 32-wide chunks do not divide: the vector kernel's rows.
    assert gemv.covers(mx.zeros((8, 48), mx.bfloat16), mx.zeros((24, 48), mx.bfloat16))
    assert not gemv.covers(mx.zeros((9, 48), mx.bfloat16), mx.zeros((24, 48), mx.bfloat16))


@pytest.mark.skipif(not ON_CUDA, reason="the kernel runs on MLX's CUDA build")
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
@pytest.mark.parametrize("rows", [2, 3, 8, 9, 16, 17, 32])
@pytest.mark.parametrize("out_features, width", [(4096, 1024), (1030, 3072), (6, 256)])
@pytest.mark.parametrize("tiles", [None, (2, 2, 4), (1, 1, 2)], ids=["tiles-default", "tiles-2-2-4", "tiles-1-1-2"])
def test_tensor_core_kernel_matches_the_matmul(dtype, rows, out_features, width, tiles):
    rng = np.random.default_rng(rows * 7 + width)
    x = mx.array(rng.standard_normal((rows, 1, width)) / 8, dtype=dtype)
    weight = mx.array(rng.standard_normal((out_features, width)) / 8, dtype=dtype)
    bias = mx.array(rng.standard_normal((out_features,)), dtype=dtype)
    got = gemv.small_batch_linear(x, weight, bias, kernel="tensor", tiles=tiles)
    with mx.stream(mx.cpu):
        want = plain_product(x.astype(mx.float32), weight.astype(mx.float32),
                             bias.astype(mx.float32))
        mx.eval(want)
    assert got.shape == (rows, 1, out_features) and got.dtype == dtype
    assert mx.allclose(got.astype(mx.float32), want, atol=3e-2, rtol=3e-2).item()


@pytest.mark.skipif(not ON_CUDA, reason="the kernel runs on MLX's CUDA build")
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16])
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("out_features, width", [(4096, 1024), (1030, 3072), (6, 256)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_kernel_matches_the_matmul(dtype, rows, out_features, width, with_bias):
    rng = np.random.default_rng(rows * 7 + width)
    x = mx.array(rng.standard_normal((rows, 1, width)) / 8, dtype=dtype)
    weight = mx.array(rng.standard_normal((out_features, width)) / 8, dtype=dtype)
    bias = mx.array(rng.standard_normal((out_features,)), dtype=dtype) if with_bias else None
    got = gemv.small_batch_linear(x, weight, bias)
    with mx.stream(mx.cpu):  # exact float32 (the GPU's matmul may round through TF32)
        want = plain_product(x.astype(mx.float32), weight.astype(mx.float32),
                             None if bias is None else bias.astype(mx.float32))
        mx.eval(want)
    assert got.shape == (rows, 1, out_features) and got.dtype == dtype
    tolerance = 1e-4 if dtype == mx.float32 else 3e-2
    assert mx.allclose(got.astype(mx.float32), want, atol=tolerance, rtol=tolerance).item()


@pytest.mark.skipif(not ON_CUDA, reason="the kernel runs on MLX's CUDA build")
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 5, 8])
@pytest.mark.parametrize("split, unroll", [(2, 2), (4, 4), (4, 1), (1, 8)])
@pytest.mark.parametrize("out_features, width", [(1030, 3072), (6, 256), (4096, 520)])
def test_vector_kernel_split_and_unrolled_matches_its_reference(dtype, rows, split, unroll,
                                                                out_features, width):
    """The width shared among a group's warps, several loads a lane in flight: widths
    that leave the last round of loads partly past the row (520 of bf16 is 65 loads),
    weights of fewer rows than a block covers, the norm, bias and residual folded in."""
    rng = np.random.default_rng(rows * 13 + split)
    x = mx.array(rng.standard_normal((rows, 1, width)), dtype=dtype)
    weight = mx.array(rng.standard_normal((out_features, width)) / 32, dtype=dtype)
    bias = mx.array(rng.standard_normal((out_features,)), dtype=dtype)
    norm = (mx.array(1 + rng.standard_normal(width) / 4, dtype=dtype), 1e-5)
    residual = mx.array(rng.standard_normal((rows, 1, out_features)), dtype=dtype)
    got = gemv.small_batch_linear(x, weight, bias, norm, residual, kernel="vector",
                                  split=split, unroll=unroll)
    with mx.stream(mx.cpu):
        as32 = (lambda a: a.astype(mx.float32))  # noqa: E731
        want = gemv.reference_linear(as32(x), as32(weight), as32(bias),
                                     (as32(norm[0]), norm[1]), as32(residual))
        mx.eval(want)
    tolerance = 1e-4 if dtype == mx.float32 else 3e-2
    assert got.shape == (rows, 1, out_features) and got.dtype == dtype
    assert mx.allclose(got.astype(mx.float32), want, atol=tolerance, rtol=tolerance).item()


@pytest.mark.skipif(not ON_CUDA, reason="the kernel runs on MLX's CUDA build")
@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("per_warp", [1, 2, 8])
@pytest.mark.parametrize("out_features, width", [(1030, 3072), (6, 256)])
def test_vector_kernel_with_several_weight_rows_a_group_matches_its_reference(
        rows, per_warp, out_features, width):
    """A group of split warps reading several weight rows (the third field of
    VLLM_METAL_GEMV_SPLIT_UNROLL), the last block's past the weight's rows."""
    rng = np.random.default_rng(rows * 7 + per_warp)
    x = mx.array(rng.standard_normal((rows, width)), dtype=mx.bfloat16)
    weight = mx.array(rng.standard_normal((out_features, width)) / 32, dtype=mx.bfloat16)
    residual = mx.array(rng.standard_normal((rows, out_features)), dtype=mx.bfloat16)
    got = gemv.small_batch_linear(x, weight, residual=residual, kernel="vector",
                                  per_warp=per_warp, split=4, unroll=4)
    with mx.stream(mx.cpu):
        want = gemv.reference_linear(x.astype(mx.float32), weight.astype(mx.float32),
                                     residual=residual.astype(mx.float32))
        mx.eval(want)
    assert mx.allclose(got.astype(mx.float32), want, atol=3e-2, rtol=3e-2).item()


@pytest.mark.skipif(not ON_CUDA, reason="the kernel runs on MLX's CUDA build")
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 8, 32])
@pytest.mark.parametrize("with_norm, with_residual", [(True, False), (False, True), (True, True)])
@pytest.mark.parametrize("kernel", ["vector", "tensor"])
def test_kernel_with_a_norm_and_a_residual_matches_its_reference(dtype, rows, with_norm,
                                                                with_residual, kernel):
    if kernel == "tensor" and dtype not in gemv.TENSOR_DTYPES:
        pytest.skip("the tensor-core kernel takes half precision")
    rng = np.random.default_rng(rows)
    width, out_features = 1024, 1030
    x = mx.array(rng.standard_normal((rows, 1, width)), dtype=dtype)
    weight = mx.array(rng.standard_normal((out_features, width)) / 32, dtype=dtype)
    norm = (mx.array(1 + rng.standard_normal(width) / 4, dtype=dtype), 1e-5) if with_norm else None
    residual = (mx.array(rng.standard_normal((rows, 1, out_features)), dtype=dtype)
                if with_residual else None)
    if kernel == "vector" and rows > gemv.MAX_ROWS:
        pytest.skip("the vector kernel takes up to MAX_ROWS rows")
    got = gemv.small_batch_linear(x, weight, None, norm, residual, kernel=kernel)
    with mx.stream(mx.cpu):
        as32 = (lambda a: None if a is None else a.astype(mx.float32))  # noqa: E731
        want = gemv.reference_linear(as32(x), as32(weight), None,
                                     None if norm is None else (as32(norm[0]), norm[1]),
                                     as32(residual))
        mx.eval(want)
    tolerance = 1e-4 if dtype == mx.float32 else 3e-2
    assert mx.allclose(got.astype(mx.float32), want, atol=tolerance, rtol=tolerance).item()


def test_reference_linear_is_the_plain_layers():
    """The reference the kernel is held to: MLX's RMS norm, then the product,
    then the residual."""
    rng = np.random.default_rng(0)
    x = mx.array(rng.standard_normal((2, 1, 64)), dtype=mx.float32)
    layer = nn.Linear(64, 24, bias=True)
    norm = nn.RMSNorm(64, eps=1e-6)
    norm.weight = mx.array(rng.standard_normal(64), dtype=mx.float32)
    residual = mx.array(rng.standard_normal((2, 1, 24)), dtype=mx.float32)
    got = gemv.reference_linear(x, layer.weight, layer.bias, (norm.weight, norm.eps), residual)
    assert mx.allclose(got, residual + layer(norm(x)), atol=1e-5).item()


def test_vector_choice_follows_the_rows_and_the_setting(monkeypatch):
    """The width split 4 ways with 4 loads in flight at 1 and 2 rows, the first
    choice above; VLLM_METAL_GEMV_SPLIT_UNROLL wins where set; a split that does not
    divide the block's warps is refused."""
    monkeypatch.delenv("VLLM_METAL_GEMV_SPLIT_UNROLL", raising=False)
    assert gemv.vector_choice(1) == gemv.vector_choice(2) == gemv.SPLIT_UNROLL == (4, 4)
    assert gemv.vector_choice(3) == gemv.vector_choice(8) == (1, 2)
    assert [gemv.rows_per_warp(r) for r in (1, 2, 3, 8)] == [1, 2, 4, 4]
    monkeypatch.setenv("VLLM_METAL_GEMV_SPLIT_UNROLL", "2-8")
    assert gemv.vector_choice(1) == gemv.vector_choice(8) == (2, 8)
    assert [gemv.rows_per_warp(r) for r in (1, 2, 3, 8)] == [1, 2, 4, 4]
    monkeypatch.setenv("VLLM_METAL_GEMV_SPLIT_UNROLL", "4-4-2")
    assert gemv.vector_choice(1) == (4, 4) and gemv.rows_per_warp(1) == gemv.rows_per_warp(8) == 2
    for bad in ("8-2", "3-1", "4-0", "4", "4-4-3", "4-4-2-1"):
        monkeypatch.setenv("VLLM_METAL_GEMV_SPLIT_UNROLL", bad)
        with pytest.raises(ValueError, match="SPLIT-UNROLL"):
            gemv.vector_choice(1)
