"""Small-batch linear layers as one CUDA kernel (a matrix-vector product).

A decode step multiplies a few rows of activations by every weight matrix. On
MLX's CUDA build the host's cost of issuing the step limits its speed, and a
matmul is the dearest primitive to issue: 19 us against 5 us for a custom kernel
(``benchmarks/issue_cost.py``). At a few rows the product is bound by reading the
weights: each warp reads a few weight rows in 16-byte loads and keeps one sum
per weight row and activation row. MLX's matmul reads large weights faster
(``LARGE_WEIGHT``), so those keep it.

``route_linears`` gives every plain ``nn.Linear`` of a loaded model (fused
projections and the output head included; an ``nn.Embedding`` for its use as a
tied output head) a call that takes the kernel
when it covers the call (``covers``: on MLX's CUDA build, up to ``MAX_ROWS``
rows of a weight under ``LARGE_WEIGHT`` bytes, the input in the weight's float
type) and MLX's matmul otherwise.
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
MAX_ROWS = 8  # the vector kernel's
DTYPES = (mx.bfloat16, mx.float16, mx.float32)
# A weight of at least LARGE_WEIGHT bytes is left to MLX's matmul at every row count: a
# model of such weights has its step set by the device, where the matmul reads them
# faster (H200, Llama-3-8B offline at batch 1: 198 tok/s against 166 through this
# kernel, benchmarks/results/gpu-trials.md; at 8 rows, Llama-3-8B's products 202 us a
# layer against the vector kernel's 280, benchmarks/linear_kernels.py). A smaller
# model's step is set by the host, where one kernel with the norm and residual folded
# in is the cheaper to issue.
LARGE_WEIGHT = 16 * 1024**2
# The tensor-core kernel (VLLM_METAL_GEMV_TENSOR_CORES): the rows it takes above the
# vector kernel's, its float types, and (groups of 8 weight rows a block, 32-wide
# chunks a warp loads at once, warps a block splitting the width).
TENSOR_MAX_ROWS = 32
TENSOR_DTYPES = (mx.bfloat16, mx.float16)
TENSOR_TILES = (1, 4, 8)
# The vector kernel's warps sharing a group of weight rows, each reading a share of the
# width (more warps, each with a shorter run of loads, for weights of few rows), and
# the loads of each weight row a lane has in flight before it uses the first.
VECTOR_SPLIT = 1
VECTOR_UNROLL = 2
# At 1 and 2 rows, the block's 4 warps share each weight row, 4 loads in flight each:
# Llama-3-8B's four products of a layer in 183 against 359 us at 1 row, 191 against 348 at
# 2 (H200, benchmarks/linear_kernels, each product alone); above, not yet measured.
SPLIT_UNROLL = (4, 4)
SPLIT_MAX_ROWS = 2

_SOURCE = """
    constexpr int VEC = 16 / sizeof(T);
    constexpr int GROUPS = WARPS / SPLIT;     // groups of R weight rows a block
    constexpr int STRIDE = SPLIT * 32 * VEC;  // positions a group's loads cover
    const int N = w_shape[0];
    const int K = w_shape[1];
    const int lane = threadIdx.x % 32;
    const int warp = threadIdx.x / 32;
    const int part = warp % SPLIT;  // which of the group's SPLIT warps: a share of the width
    const int first = (blockIdx.x * GROUPS + warp / SPLIT) * R;
    const bool active = first < N;  // no early return: a split group meets at a barrier

    float acc[R][M];
    float squares[M];  // NORM: each row's sum of squares, this lane's share
    for (int m = 0; m < M; ++m) {
        squares[m] = 0.f;
        for (int r = 0; r < R; ++r) acc[r][m] = 0.f;
    }
    const uint4 none = make_uint4(0, 0, 0, 0);
    for (int base = (part * 32 + lane) * VEC; active && base < K; base += U * STRIDE) {
        // U loads of each weight row in flight before any is used.
        uint4 wp[U][R];
        uint4 gp[U];
        for (int u = 0; u < U; ++u) {
            const int k = base + u * STRIDE;
            for (int r = 0; r < R; ++r) {
                const int row = min(first + r, N - 1);  // past N: read again, never stored
                wp[u][r] = k < K ? *reinterpret_cast<const uint4*>(w + (long)row * K + k) : none;
            }
            if (NORM) gp[u] = k < K ? *reinterpret_cast<const uint4*>(norm_weight + k) : none;
        }
        for (int u = 0; u < U; ++u) {
            const int k = base + u * STRIDE;
            if (k >= K) break;
            float wf[R][VEC];
            for (int r = 0; r < R; ++r) {
                const T* wv = reinterpret_cast<const T*>(&wp[u][r]);
                for (int i = 0; i < VEC; ++i) wf[r][i] = static_cast<float>(wv[i]);
            }
            float gf[VEC];
            if (NORM) {
                const T* gv = reinterpret_cast<const T*>(&gp[u]);
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
    }
    // Each warp's sums over its lanes, then (SPLIT > 1) over the group's warps.
    for (int m = 0; m < M; ++m) {
        for (int o = 16; o > 0; o >>= 1) squares[m] += __shfl_xor_sync(0xffffffff, squares[m], o);
        for (int r = 0; r < R; ++r)
            for (int o = 16; o > 0; o >>= 1) acc[r][m] += __shfl_xor_sync(0xffffffff, acc[r][m], o);
    }
    if (SPLIT > 1) {
        __shared__ float shared_acc[WARPS][R][M];
        __shared__ float shared_squares[WARPS][M];
        if (lane == 0) {
            for (int m = 0; m < M; ++m) {
                shared_squares[warp][m] = squares[m];
                for (int r = 0; r < R; ++r) shared_acc[warp][r][m] = acc[r][m];
            }
        }
        __syncthreads();
        if (part != 0) return;
        for (int p = 1; p < SPLIT; ++p)
            for (int m = 0; m < M; ++m) {
                squares[m] += shared_squares[warp + p][m];
                for (int r = 0; r < R; ++r) acc[r][m] += shared_acc[warp + p][r][m];
            }
    }
    if (!active || lane != 0) return;
    for (int m = 0; m < M; ++m) {
        // RMS norm of the row: x * rsqrt(mean(x^2) + eps) * weight, the weight taken above.
        const float scale = NORM ? rsqrtf(squares[m] / K + eps[0]) : 1.f;
        for (int r = 0; r < R && first + r < N; ++r) {
            float s = acc[r][m] * scale;
            if (BIAS) s += static_cast<float>(bias[first + r]);
            if (RESIDUAL) s += static_cast<float>(residual[(long)m * N + first + r]);
            out[(long)m * N + first + r] = static_cast<T>(s);
        }
    }
"""


# The same product on tensor cores, for up to ``TENSOR_MAX_ROWS`` rows (bf16, fp16): a block's
# KSPLIT warps share NT groups of 8 weight rows and split the width between them.
# In each 32-wide chunk of the width a lane loads 16 bytes of one weight row and of
# one or two activation rows (rows g and g + 8 of each 16-row tile, g = lane / 4).
# An mma (m16n8k16) sums over 16 positions of the width in any order as long as both
# operands agree, so the lane's 8 loaded positions feed two mma's as they lie: the
# fragment's positions 2q, 2q+1, 2q+8, 2q+9 (q = lane % 4) are loaded ones 0-3, then
# 4-7. Partial sums meet in shared memory, where the norm's scale, the bias and the
# residual are applied.
_MMA_SOURCE = """
    const int N = w_shape[0];
    const int K = w_shape[1];
    // Rows from the input's shape, not a template constant: prefill chunks of any
    // 9 to 32 rows share one compiled kernel per tile count (MT).
    int M = 1;
    for (int i = 0; i < x_ndim - 1; ++i) M *= x_shape[i];
    const int chunks = K / 32;
    const int lane = threadIdx.x % 32;
    const int warp = threadIdx.x / 32;
    const int g = lane / 4;
    const int q = lane % 4;
    const int n0 = blockIdx.x * (8 * NT);
    const uint4 zero = make_uint4(0, 0, 0, 0);

    float acc[MT][NT][4];
    float squares[MT][2];
    for (int t = 0; t < MT; ++t) {
        squares[t][0] = squares[t][1] = 0.f;
        for (int s = 0; s < NT; ++s)
            for (int i = 0; i < 4; ++i) acc[t][s][i] = 0.f;
    }
    for (int first = warp * U; first < chunks; first += KSPLIT * U) {
        uint4 wv[U][NT];
        uint4 xv[U][MT][2];
        #pragma unroll
        for (int u = 0; u < U; ++u) {
            const bool in_width = first + u < chunks;
            const long k = (long)(first + u) * 32 + q * 8;
            #pragma unroll
            for (int s = 0; s < NT; ++s) {
                const int n = min(n0 + s * 8 + g, N - 1);  // past N: read again, never stored
                wv[u][s] = in_width ? *reinterpret_cast<const uint4*>(w + (long)n * K + k) : zero;
            }
            #pragma unroll
            for (int t = 0; t < MT; ++t)
                #pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const int m = t * 16 + h * 8 + g;
                    xv[u][t][h] = in_width && m < M
                        ? *reinterpret_cast<const uint4*>(x + (long)m * K + k) : zero;
                }
        }
        #pragma unroll
        for (int u = 0; u < U; ++u) {
            if (NORM && first + u < chunks) {
                const long k = (long)(first + u) * 32 + q * 8;
                const uint4 gamma = *reinterpret_cast<const uint4*>(norm_weight + k);
                const T* gv = reinterpret_cast<const T*>(&gamma);
                for (int t = 0; t < MT; ++t)
                    for (int h = 0; h < 2; ++h) {
                        T* xs = reinterpret_cast<T*>(&xv[u][t][h]);
                        for (int i = 0; i < 8; ++i) {
                            const float v = static_cast<float>(xs[i]);
                            squares[t][h] += v * v;
                            xs[i] = static_cast<T>(v * static_cast<float>(gv[i]));
                        }
                    }
            }
            #pragma unroll
            for (int t = 0; t < MT; ++t)
                #pragma unroll
                for (int s = 0; s < NT; ++s)
                    #pragma unroll
                    for (int half = 0; half < 2; ++half) {
                        const unsigned* a0 = reinterpret_cast<const unsigned*>(&xv[u][t][0]) + 2 * half;
                        const unsigned* a1 = reinterpret_cast<const unsigned*>(&xv[u][t][1]) + 2 * half;
                        const unsigned* b = reinterpret_cast<const unsigned*>(&wv[u][s]) + 2 * half;
                        float* d = acc[t][s];
                        if (F16) {
                            asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
                                "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                                : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                                : "r"(a0[0]), "r"(a1[0]), "r"(a0[1]), "r"(a1[1]), "r"(b[0]), "r"(b[1]));
                        } else {
                            asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                                "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                                : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                                : "r"(a0[0]), "r"(a1[0]), "r"(a0[1]), "r"(a1[1]), "r"(b[0]), "r"(b[1]));
                        }
                    }
        }
    }

    // Each warp's partial sums (lane holds rows g and g + 8 of each tile, columns
    // 2q and 2q + 1 of each group of 8), then one output per thread.
    __shared__ float partial[KSPLIT][MT * 16][NT * 8];
    __shared__ float sums[KSPLIT][MT * 16];
    for (int t = 0; t < MT; ++t) {
        for (int s = 0; s < NT; ++s)
            for (int i = 0; i < 4; ++i)
                partial[warp][t * 16 + g + 8 * (i / 2)][s * 8 + 2 * q + i % 2] = acc[t][s][i];
        for (int h = 0; h < 2; ++h) {
            float total = squares[t][h];
            total += __shfl_xor_sync(0xffffffff, total, 1);
            total += __shfl_xor_sync(0xffffffff, total, 2);
            if (q == 0) sums[warp][t * 16 + h * 8 + g] = total;
        }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < M * NT * 8; i += KSPLIT * 32) {
        const int m = i / (NT * 8);
        const int col = i % (NT * 8);
        const int n = n0 + col;
        if (n >= N) continue;
        float s = 0.f;
        float total = 0.f;
        for (int v = 0; v < KSPLIT; ++v) {
            s += partial[v][m][col];
            total += sums[v][m];
        }
        if (NORM) s *= rsqrtf(total / K + eps[0]);
        if (BIAS) s += static_cast<float>(bias[n]);
        if (RESIDUAL) s += static_cast<float>(residual[(long)m * N + n]);
        out[(long)m * N + n] = static_cast<T>(s);
    }
"""


def available() -> bool:
    return cuda_feature("VLLM_METAL_GEMV_KERNEL", envs.VLLM_METAL_GEMV_KERNEL)


def tensor_cores() -> bool:
    """Whether calls of more than ``MAX_ROWS`` rows take the tensor-core kernel
    (``VLLM_METAL_GEMV_TENSOR_CORES``): its bf16 and fp16 mma needs compute
    capability 8.0 or later (an A100, an H100); set to 1 on an older GPU, startup stops."""
    choice = envs.VLLM_METAL_GEMV_TENSOR_CORES
    if not cuda_feature("VLLM_METAL_GEMV_TENSOR_CORES", choice):
        return False
    major = _compute_capability()
    if major >= 8:
        return True
    if choice == "1":
        raise RuntimeError(f"VLLM_METAL_GEMV_TENSOR_CORES=1 needs an NVIDIA GPU of compute "
                           f"capability 8.0 or later; this one is {major}.x: unset it")
    return False


@functools.cache
def _compute_capability() -> int:
    info = mx.device_info() if hasattr(mx, "device_info") else {}
    return int(info.get("compute_capability_major", 0))


def _takes_tensor_cores(rows: int, weight: mx.array) -> bool:
    return (MAX_ROWS < rows <= TENSOR_MAX_ROWS and weight.dtype in TENSOR_DTYPES
            and weight.shape[1] % 32 == 0 and tensor_cores())


def covers(x: mx.array, weight: mx.array) -> bool:
    """Calls the kernels take: the input and the weight in one float type, rows a
    whole number of 16-byte loads, under ``LARGE_WEIGHT`` bytes; 1 to ``MAX_ROWS``
    rows of activations, or up to ``TENSOR_MAX_ROWS`` where the tensor-core kernel
    takes them."""
    if weight.ndim != 2 or x.ndim == 0 or weight.dtype not in DTYPES or x.dtype != weight.dtype:
        return False
    width = weight.shape[1]
    per_load = 16 // weight.dtype.size
    if x.shape[-1] != width or width % per_load:
        return False
    rows = x.size // width
    if weight.nbytes >= LARGE_WEIGHT:
        return False
    return 1 <= rows <= MAX_ROWS or _takes_tensor_cores(rows, weight)


@functools.cache
def _kernel(tensor_cores: bool = False):
    """The vector kernel, or the tensor-core one: the same inputs and output."""
    return mx.fast.cuda_kernel(
        name="vllm_metal_small_batch_linear" + ("_mma" if tensor_cores else ""),
        input_names=["x", "w", "bias", "norm_weight", "eps", "residual"],
        output_names=["out"],
        source=_MMA_SOURCE if tensor_cores else _SOURCE,
        ensure_row_contiguous=True,
    )


@functools.cache
def _unused(dtype) -> mx.array:
    return mx.zeros((8,), dtype=dtype)  # a 16-byte load's worth of an input not used



def rows_per_warp(rows: int) -> int:
    """Weight rows each warp (each group of split warps) reads: the third field of
    ``VLLM_METAL_GEMV_SPLIT_UNROLL`` where given. Else each activation row loaded
    serves as many weight rows as there are activation rows, up to 4: with several
    activation rows, one weight row a warp would load them from cache as often as
    the weights from memory, and the cache's bandwidth, not the memory's, would
    bound the kernel (Llama-3-8B at 8 rows: a third of the memory's)."""
    chosen = envs.VLLM_METAL_GEMV_SPLIT_UNROLL
    if chosen is not None and chosen[2] is not None:
        return chosen[2]
    return 1 if rows == 1 else 2 if rows == 2 else 4


def vector_choice(rows: int) -> tuple[int, int]:
    """The vector kernel's (split, unroll) for ``rows`` rows:
    ``VLLM_METAL_GEMV_SPLIT_UNROLL`` where given; else, up to ``SPLIT_MAX_ROWS`` rows,
    ``SPLIT_UNROLL``, and ``VECTOR_SPLIT`` and ``VECTOR_UNROLL`` above."""
    chosen = envs.VLLM_METAL_GEMV_SPLIT_UNROLL
    if chosen is not None:
        return chosen[:2]
    return SPLIT_UNROLL if rows <= SPLIT_MAX_ROWS else (VECTOR_SPLIT, VECTOR_UNROLL)


def small_batch_linear(x: mx.array, weight: mx.array, bias: mx.array | None = None,
                       norm: tuple[mx.array, float] | None = None,
                       residual: mx.array | None = None,
                       per_warp: int | None = None, kernel: str | None = None,
                       tiles: tuple[int, int, int] | None = None,
                       split: int | None = None, unroll: int | None = None) -> mx.array:
    """``x @ weight.T + bias`` for ``x`` [..., K] and ``weight`` [N, K] (``covers``).
    ``norm``: (weight [K], eps) of an RMS norm applied to ``x`` first; ``residual``
    [..., N]: added to the result. ``kernel`` ("vector" or "tensor"), ``per_warp``
    (the vector kernel's weight rows a warp), ``split`` and ``unroll`` (its
    ``vector_choice``) and ``tiles`` (``TENSOR_TILES``) stand in for
    the choices made here (``benchmarks/linear_kernels.py`` compares them)."""
    out_features, width = weight.shape
    rows = x.size // width
    if kernel is None:
        kernel = "tensor" if _takes_tensor_cores(rows, weight) else "vector"
    unused = _unused(x.dtype)
    # The kernels read ``x`` as rows of ``width`` and write rows of ``out_features``,
    # whatever the leading axes: no reshapes (each a primitive the host issues).
    inputs = [x, weight, bias if bias is not None else unused,
              norm[0] if norm is not None else unused,
              constant(norm[1] if norm is not None else 0.0),
              residual if residual is not None else unused]
    options = [("T", weight.dtype), ("BIAS", bias is not None),
               ("NORM", norm is not None), ("RESIDUAL", residual is not None)]
    if kernel == "tensor":
        groups, unroll, split = tiles or TENSOR_TILES
        threads = 32 * split
        blocks = -(-out_features // (8 * groups))
        launch = _kernel(tensor_cores=True)
        options += [("MT", -(-rows // 16)), ("NT", groups), ("U", unroll), ("KSPLIT", split),
                    ("F16", weight.dtype == mx.float16)]
    else:
        per_warp = per_warp or rows_per_warp(rows)
        chosen_split, chosen_unroll = vector_choice(rows)
        split, unroll = split or chosen_split, unroll or chosen_unroll
        if WARPS % split:
            raise ValueError(f"split {split} does not divide the block's {WARPS} warps")
        threads = 32 * WARPS
        blocks = -(-out_features // (WARPS // split * per_warp))
        launch = _kernel()
        options += [("M", rows), ("R", per_warp), ("WARPS", WARPS), ("SPLIT", split),
                    ("U", unroll)]
    return launch(inputs=inputs, template=options, grid=(blocks * threads, 1, 1),
                  threadgroup=(threads, 1, 1), output_shapes=[(*x.shape[:-1], out_features)],
                  output_dtypes=[x.dtype])[0]


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


def warm_up_rows(model: nn.Module) -> list[int]:
    """Row counts at which the kernels launch a variant of their own (the vector kernel's
    rows are a template constant; the tensor-core kernel's 16-row tiles are one), each
    compiled at its first launch: a forward of each at startup compiles them before a
    request waits (Qwen3-0.6B's first 32-token prompt took 2 s on an H100; the decode
    warm-up's products, with their norms and residuals folded in, are other variants).
    No rows where no layer of ``model`` takes the kernels."""
    takes_kernel = any(isinstance(module, (SmallBatchLinear, SmallBatchEmbedding))
                       and module.weight.nbytes < LARGE_WEIGHT
                       for _, module in model.named_modules())
    if not takes_kernel:
        return []
    rows = list(range(1, MAX_ROWS + 1))
    if tensor_cores():
        rows += list(range(16, TENSOR_MAX_ROWS + 1, 16))
    return rows


def route_linears(model: nn.Module) -> int:
    """Turn every plain ``nn.Linear`` of ``model`` into a ``SmallBatchLinear`` where
    the kernel is available; returns how many. Settings that cannot be honoured
    stop startup here."""
    if tensor_cores() and envs.VLLM_METAL_GEMV_TENSOR_CORES == "1" and not available():
        raise RuntimeError("VLLM_METAL_GEMV_TENSOR_CORES=1 runs the custom linear kernel, which "
                           "VLLM_METAL_GEMV_KERNEL=0 turns off: unset one of them")
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
