"""Small-batch linear layers as one CUDA kernel (a matrix-vector product).

A decode step multiplies a few rows of activations by every weight matrix. On
MLX's CUDA build the host's cost of issuing the step limits its speed, and a
matmul is the dearest primitive to issue: 19 us against 5 us for a custom kernel
(``benchmarks/issue_cost.py``). At a few rows the product is bound by reading the
weights, which a plain kernel does as well as a library's: each warp reads a
few weight rows in 16-byte loads and keeps one sum per weight row and
activation row.

``route_linears`` gives every plain ``nn.Linear`` of a loaded model (fused
projections and the output head included; an ``nn.Embedding`` for its use as a
tied output head) a call that takes the kernel
when it covers the call (``covers``: on MLX's CUDA build, up to ``MAX_ROWS``
rows, the input in the weight's float type) and MLX's matmul otherwise.
Quantized layers keep MLX's own kernels. The parameter tree does not change,
so adapters and loaders see the same layers.
"""

import functools

import mlx.core as mx
import mlx.nn as nn

from vllm_metal import envs
from vllm_metal.attention.decode_kernel import constant
from vllm_metal.device import cuda_feature

WARPS = 4
MAX_ROWS = 8
DTYPES = (mx.bfloat16, mx.float16, mx.float32)

_SOURCE = """
    constexpr int VEC = 16 / sizeof(T);
    const int N = w_shape[0];
    const int K = w_shape[1];
    const int lane = threadIdx.x % 32;
    const int first = (blockIdx.x * WARPS + threadIdx.x / 32) * R;
    if (first >= N) return;

    float acc[R][M];
    float squares[M];  // NORM: each row's sum of squares, this lane's share
    for (int m = 0; m < M; ++m) {
        squares[m] = 0.f;
        for (int r = 0; r < R; ++r) acc[r][m] = 0.f;
    }
    #pragma unroll 2
    for (int k = lane * VEC; k < K; k += 32 * VEC) {
        float wf[R][VEC];
        for (int r = 0; r < R; ++r) {
            const int row = min(first + r, N - 1);  // past N: read again, never stored
            const uint4 packed = *reinterpret_cast<const uint4*>(w + (long)row * K + k);
            const T* wv = reinterpret_cast<const T*>(&packed);
            for (int i = 0; i < VEC; ++i) wf[r][i] = static_cast<float>(wv[i]);
        }
        float gf[VEC];
        if (NORM) {
            const uint4 packed = *reinterpret_cast<const uint4*>(norm_weight + k);
            const T* gv = reinterpret_cast<const T*>(&packed);
            for (int i = 0; i < VEC; ++i) gf[i] = static_cast<float>(gv[i]);
        }
        for (int m = 0; m < M; ++m) {
            const uint4 packed = *reinterpret_cast<const uint4*>(x + (long)m * K + k);
            const T* xv = reinterpret_cast<const T*>(&packed);
            float xf[VEC];
            for (int i = 0; i < VEC; ++i) xf[i] = static_cast<float>(xv[i]);
            if (NORM) {
                for (int i = 0; i < VEC; ++i) {
                    squares[m] += xf[i] * xf[i];
                    xf[i] *= gf[i];
                }
            }
            for (int r = 0; r < R; ++r)
                for (int i = 0; i < VEC; ++i) acc[r][m] += wf[r][i] * xf[i];
        }
    }
    for (int m = 0; m < M; ++m) {
        float scale = 1.f;
        if (NORM) {
            // RMS norm of the row: x * rsqrt(mean(x^2) + eps) * weight, the weight taken above.
            float total = squares[m];
            for (int o = 16; o > 0; o >>= 1) total += __shfl_xor_sync(0xffffffff, total, o);
            scale = rsqrtf(total / K + eps[0]);
        }
        for (int r = 0; r < R; ++r) {
            float s = acc[r][m];
            for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffff, s, o);
            if (lane == 0 && first + r < N) {
                s *= scale;
                if (BIAS) s += static_cast<float>(bias[first + r]);
                if (RESIDUAL) s += static_cast<float>(residual[(long)m * N + first + r]);
                out[(long)m * N + first + r] = static_cast<T>(s);
            }
        }
    }
"""


def available() -> bool:
    return cuda_feature("VLLM_METAL_GEMV_KERNEL", envs.VLLM_METAL_GEMV_KERNEL)


def covers(x: mx.array, weight: mx.array) -> bool:
    """Calls the kernel handles: 1 to ``MAX_ROWS`` rows of activations, the input
    and the weight in one float type, rows a whole number of 16-byte loads."""
    if weight.ndim != 2 or x.ndim == 0 or weight.dtype not in DTYPES or x.dtype != weight.dtype:
        return False
    width = weight.shape[1]
    per_load = 16 // weight.dtype.size
    return x.shape[-1] == width and width % per_load == 0 and 1 <= x.size // width <= MAX_ROWS


@functools.cache
def _kernel():
    return mx.fast.cuda_kernel(
        name="vllm_metal_small_batch_linear",
        input_names=["x", "w", "bias", "norm_weight", "eps", "residual"],
        output_names=["out"],
        source=_SOURCE,
        ensure_row_contiguous=True,
    )


@functools.cache
def _unused(dtype) -> mx.array:
    return mx.zeros((8,), dtype=dtype)  # a 16-byte load's worth of an input not used



def _rows_per_warp(rows: int) -> int:
    """Weight rows each warp reads: each activation row loaded then serves that
    many weight rows. With several activation rows, one weight row a warp would
    load them from cache as often as the weights from memory, and the cache's
    bandwidth, not the memory's, would bound the kernel (Llama-3-8B at 8 rows:
    a third of the memory's)."""
    return 1 if rows == 1 else 2 if rows == 2 else 4


def small_batch_linear(x: mx.array, weight: mx.array, bias: mx.array | None = None,
                       norm: tuple[mx.array, float] | None = None,
                       residual: mx.array | None = None) -> mx.array:
    """``x @ weight.T + bias`` for ``x`` [..., K] of at most ``MAX_ROWS`` rows and
    ``weight`` [N, K] (``covers``). ``norm``: (weight [K], eps) of an RMS norm
    applied to ``x`` first; ``residual`` [..., N]: added to the result."""
    out_features, width = weight.shape
    rows = x.size // width
    threads = 32 * WARPS
    per_warp = _rows_per_warp(rows)
    blocks = -(-out_features // (WARPS * per_warp))
    unused = _unused(x.dtype)
    # The kernel reads ``x`` as rows of ``width`` and writes rows of ``out_features``,
    # whatever the leading axes: no reshapes (each a primitive the host issues).
    return _kernel()(
        inputs=[x, weight, bias if bias is not None else unused,
                norm[0] if norm is not None else unused,
                constant(norm[1] if norm is not None else 0.0),
                residual if residual is not None else unused],
        template=[("T", weight.dtype), ("M", rows), ("R", per_warp), ("BIAS", bias is not None),
                  ("NORM", norm is not None), ("RESIDUAL", residual is not None),
                  ("WARPS", WARPS)],
        grid=(blocks * threads, 1, 1),
        threadgroup=(threads, 1, 1),
        output_shapes=[(*x.shape[:-1], out_features)],
        output_dtypes=[x.dtype],
    )[0]


def reference_linear(x: mx.array, weight: mx.array, bias: mx.array | None = None,
                     norm: tuple[mx.array, float] | None = None,
                     residual: mx.array | None = None) -> mx.array:
    """What ``small_batch_linear`` computes, in MLX's own operations (its
    specification in the tests, and the way for calls it does not cover)."""
    if norm is not None:
        x = mx.fast.rms_norm(x, norm[0], norm[1])
    out = x @ weight.T
    if bias is not None:
        out = out + bias
    return out if residual is None else residual + out


class SmallBatchLinear(nn.Linear):
    """An ``nn.Linear`` whose few-row calls take the kernel."""

    def __call__(self, x: mx.array) -> mx.array:
        if covers(x, self.weight):
            return small_batch_linear(x, self.weight, self.get("bias"))
        return super().__call__(x)


class SmallBatchEmbedding(nn.Embedding):
    """An ``nn.Embedding`` whose use as the output head (tied weights) takes the
    kernel for few rows."""

    def as_linear(self, x: mx.array) -> mx.array:
        if covers(x, self.weight):
            return small_batch_linear(x, self.weight)
        return super().as_linear(x)


def route_linears(model: nn.Module) -> int:
    """Turn every plain ``nn.Linear`` of ``model`` into a ``SmallBatchLinear`` where
    the kernel is available; returns how many."""
    if not available():
        return 0
    routed = 0
    for _, module in model.named_modules():
        # Same attributes and parameters; only the call differs.
        if type(module) is nn.Linear:
            module.__class__ = SmallBatchLinear
            routed += 1
        elif type(module) is nn.Embedding:
            module.__class__ = SmallBatchEmbedding
            routed += 1
    return routed
