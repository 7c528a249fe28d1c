"""Decode attention as one CUDA kernel that reads the paged pools directly.

A decode step's attention, done with MLX's own operations, gathers each
request's context out of the pools and hides the keys past its length with a
mask. On MLX's CUDA build the fused attention kernel takes no array mask, so a
masked step falls back to five or more primitives per layer (matmul, select,
softmax, matmul) besides the gather; the host's cost of issuing them limits a
decode step (``benchmarks/issue_cost.py``: 18 us for the gather, 63 us for the
masked attention, 5 us for a custom kernel). This kernel is one primitive: one
thread block per (request, query head), each warp walking a share of the keys
with an online softmax, the warps' partial sums merged at the end. Keys are
read where they lie in the pool (``read_rows``), up to each request's length,
from its window's start, with attention sinks where the model has them.

It runs only on MLX's CUDA build (``available()``); elsewhere, and for shapes it
does not cover, attention goes the plain way (``LayerCache.update_and_fetch``
and ``mx.fast.scaled_dot_product_attention``), which also serves as its
reference in the tests.
"""

import functools

import mlx.core as mx

from vllm_metal import envs
from vllm_metal.device import cuda_feature, on_cuda

WARPS = 4
DTYPES = (mx.bfloat16, mx.float16, mx.float32)

# CUDA source both attention kernels share (``fused_decode`` too).
# A lane's score of key ``key_row`` against the scaled query in ``q_all``, into ``s``.
SCORE_KEY = """
                const uint4* k = reinterpret_cast<const uint4*>(pool + key_row * D);
                float dot = 0.f;
                #pragma unroll
                for (int c = 0; c < D / VEC; ++c) {
                    const uint4 packed = k[c];
                    const P* kv = reinterpret_cast<const P*>(&packed);
                    #pragma unroll
                    for (int t = 0; t < VEC; ++t) dot += q_all[c * VEC + t] * static_cast<float>(kv[t]);
                }
                s = dot;
"""
# A warp's online softmax over its 32 scores ``s`` (``valid`` lanes) of the positions
# ``base`` on, up to ``end``: the running max ``m``, sum ``l`` and accumulator ``acc``
# rescaled, each lane's weight ``p``, and ``count``, the chunk's positions.
CHUNK_SOFTMAX = """
            float chunk_max = s;
            for (int o = 16; o > 0; o >>= 1) {
                chunk_max = fmaxf(chunk_max, __shfl_xor_sync(0xffffffff, chunk_max, o));
            }
            const float m_new = fmaxf(m, chunk_max);  // lane 0's key is always valid
            const float keep = expf(m - m_new);
            const float p = valid ? expf(s - m_new) : 0.f;
            float p_sum = p;
            for (int o = 16; o > 0; o >>= 1) p_sum += __shfl_xor_sync(0xffffffff, p_sum, o);
            l = l * keep + p_sum;
            for (int i = 0; i < PER; ++i) acc[i] *= keep;
            const int count = min(32, end - base);
"""
# The chunk's value rows (each lane's ``value_row``) weighted into ``acc``. No branch
# in the loop: the loads of several positions are in flight at once.
ADD_VALUES = """
            #pragma unroll 8
            for (int t = 0; t < count; ++t) {
                const float p_t = __shfl_sync(0xffffffff, p, t);
                const int row_t = __shfl_sync(0xffffffff, value_row, t);
                const P* v = pool + (long)row_t * D + lane * PER;
                for (int i = 0; i < PER; ++i) acc[i] += p_t * static_cast<float>(v[i]);
            }
"""
# The warps' partial softmax sums merged (with a ``sink`` logit, -inf for none) and
# written to ``out`` [B, HQ, D] (or [B, 1, HQ * D]: the same memory).
MERGE_WARPS = """
    __shared__ float warp_max[WARPS];
    __shared__ float warp_sum[WARPS];
    __shared__ float warp_acc[WARPS][D];
    if (lane == 0) {
        warp_max[warp] = m;
        warp_sum[warp] = l;
    }
    for (int i = 0; i < PER; ++i) warp_acc[warp][lane * PER + i] = acc[i];
    __syncthreads();
    if (warp != 0) return;

    float M = sink;
    for (int w = 0; w < WARPS; ++w) M = fmaxf(M, warp_max[w]);
    float L = sink == neg_inf ? 0.f : expf(sink - M);
    float weight[WARPS];
    for (int w = 0; w < WARPS; ++w) {
        weight[w] = warp_max[w] == neg_inf ? 0.f : expf(warp_max[w] - M);
        L += warp_sum[w] * weight[w];
    }
    for (int i = 0; i < PER; ++i) {
        float o = 0.f;
        for (int w = 0; w < WARPS; ++w) o += warp_acc[w][lane * PER + i] * weight[w];
        out[((long)b * HQ + h) * D + lane * PER + i] = static_cast<P>(o / L);
    }
"""

_SOURCE = """
    constexpr int PER = D / 32;
    const float neg_inf = __int_as_float(0xff800000);
    const int B = q_shape[0];
    const int HQ = q_shape[1];
    const int HKV = rows_shape[1];
    const long rs0 = rows_strides[0], rs1 = rows_strides[1], rs2 = rows_strides[2];
    const int bh = blockIdx.x;
    const int b = bh / HQ;
    const int h = bh % HQ;
    const int kvh = h / (HQ / HKV);
    const int lane = threadIdx.x % 32;
    const int warp = threadIdx.x / 32;
    const int len = offsets[b] + 1;
    const int start = WINDOW > 0 ? max(0, len - WINDOW) : 0;
    const float scale = scale_arr[0];
    (void)after;  // an input only for its order: it runs after the pool's write

    const long q_base = (long)b * q_strides[0] + (long)h * q_strides[1];
    // Read rows through their strides: an eager step's rows are a slice of wider ones.
    const int* key_rows = rows + (long)b * rs0 + (long)kvh * rs1;
    const int* value_rows = rows + (long)(B + b) * rs0 + (long)kvh * rs1;

    float m = neg_inf;
    float l = 0.f;
    float acc[PER];
    for (int i = 0; i < PER; ++i) acc[i] = 0.f;
    if (KEY_PER_LANE) {
        // 32 keys at a time per warp: each lane scores one key with the whole query
        // (independent loads, many in flight), then the warp adds the 32 value rows,
        // each lane its PER dimensions.
        constexpr int VEC = 16 / sizeof(P);
        __shared__ float q_all[D];
        for (int i = threadIdx.x; i < D; i += blockDim.x) {
            q_all[i] = static_cast<float>(q[q_base + (long)i * q_strides[3]]) * scale;
        }
        __syncthreads();
        const int end = len;
        for (int base = start + warp * 32; base < end; base += WARPS * 32) {
            const int j = base + lane;
            const bool valid = j < end;
            float s = neg_inf;
            int value_row = 0;
            if (valid) {
                const long key_row = key_rows[j * rs2];
                value_row = value_rows[j * rs2];
""" + SCORE_KEY + """
            }
""" + CHUNK_SOFTMAX + ADD_VALUES + """
            m = m_new;
        }
    } else {
        // One key at a time per warp, each lane its PER dimensions of it.
        float qv[PER];
        for (int i = 0; i < PER; ++i) {
            qv[i] = static_cast<float>(q[q_base + (long)(lane * PER + i) * q_strides[3]]) * scale;
        }
        for (int j = start + warp; j < len; j += WARPS) {
            const P* k = pool + (long)key_rows[j * rs2] * D + lane * PER;
            float s = 0.f;
            for (int i = 0; i < PER; ++i) s += qv[i] * static_cast<float>(k[i]);
            for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffff, s, o);
            const float m_new = fmaxf(m, s);
            const float keep = expf(m - m_new);
            const float p = expf(s - m_new);
            l = l * keep + p;
            const P* v = pool + (long)value_rows[j * rs2] * D + lane * PER;
            for (int i = 0; i < PER; ++i) acc[i] = acc[i] * keep + p * static_cast<float>(v[i]);
            m = m_new;
        }
    }

    const float sink = SINKS ? static_cast<float>(sinks[h]) : neg_inf;
""" + MERGE_WARPS


_WRITE_SOURCE = """
    // keys, values: [B, H, L, D] at any strides; rows: [E * B, H, L], the keys' pool
    // rows then (E == 2) the values'. One thread per value written.
    const int B = keys_shape[0], H = keys_shape[1], L = keys_shape[2], D = keys_shape[3];
    const long per_entry = (long)B * H * L * D;
    const long idx = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx == 0) written[0] = 0;
    if (idx >= E * per_entry) return;
    const int e = idx / per_entry;
    long rest = idx % per_entry;
    const int d = rest % D;
    rest /= D;
    const int l = rest % L;
    rest /= L;
    const int h = rest % H;
    const int b = rest / H;
    const float value = e == 0
        ? static_cast<float>(keys[b * keys_strides[0] + h * keys_strides[1]
                                  + l * keys_strides[2] + d * keys_strides[3]])
        : static_cast<float>(values[b * values_strides[0] + h * values_strides[1]
                                    + l * values_strides[2] + d * values_strides[3]]);
    const long row = rows[(e * B + b) * rows_strides[0] + h * rows_strides[1]
                          + l * rows_strides[2]];
    // The pool is this kernel's input: MLX sees no new array, the buffer stays the pool's.
    P* target = const_cast<P*>(pool);
    target[row * D + d] = static_cast<P>(value);
"""


def writes_in_place(fused_blocks: bool = False) -> bool:
    """Whether compiled decode steps write the pools in place (``write_in_place``):
    by default where the fused decode step runs (``fused_blocks``), whose attention
    kernel writes them; set to 1, also with the other layers' steps."""
    choice = envs.VLLM_METAL_KV_WRITE_IN_PLACE
    if choice == "auto":
        return fused_blocks and on_cuda()
    return cuda_feature("VLLM_METAL_KV_WRITE_IN_PLACE", choice)


def available() -> bool:
    return cuda_feature("VLLM_METAL_PAGED_ATTENTION_KERNEL", envs.VLLM_METAL_PAGED_ATTENTION_KERNEL)


def key_per_lane() -> bool:
    """Whether the kernel scores a key per lane (``paged_decode_attention``); set to
    1 where the kernel does not run, startup stops."""
    on = cuda_feature("VLLM_METAL_PAGED_ATTENTION_KEY_PER_LANE",
                      "1" if envs.VLLM_METAL_PAGED_ATTENTION_KEY_PER_LANE else "0")
    if on and not available():
        raise RuntimeError("VLLM_METAL_PAGED_ATTENTION_KEY_PER_LANE=1 shapes the paged attention "
                           "kernel, which VLLM_METAL_PAGED_ATTENTION_KERNEL=0 turns off: unset "
                           "one of them")
    return on


def covers(queries: mx.array, pool: mx.array) -> bool:
    """Shapes and types the kernel handles: one query per request, head sizes that
    are a multiple of 32 up to 256, the query and pool in one float type."""
    head_dim = queries.shape[-1]
    return (queries.ndim == 4 and queries.shape[2] == 1 and head_dim % 32 == 0
            and head_dim <= 256 and pool.shape[-1] == head_dim
            and queries.dtype == pool.dtype and pool.dtype in DTYPES)


@functools.cache
def _kernel():
    return mx.fast.cuda_kernel(
        name="vllm_metal_paged_decode_attention",
        input_names=["q", "pool", "rows", "offsets", "scale_arr", "sinks", "after"],
        output_names=["out"],
        source=_SOURCE,
        ensure_row_contiguous=False,
    )


@functools.cache
def _write_kernel():
    return mx.fast.cuda_kernel(
        name="vllm_metal_paged_kv_write",
        input_names=["pool", "rows", "keys", "values"],
        output_names=["written"],
        source=_WRITE_SOURCE,
        ensure_row_contiguous=False,  # keys and values are views; the pool is never one
    )


def write_in_place(pool: mx.array, rows: mx.array, keys: mx.array,
                   values: mx.array | None = None) -> mx.array:
    """Write ``keys`` and ``values`` [B, H, L, D] to the pool rows ``rows`` [2B, H, L]
    (keys' rows, then values'; with no ``values``, [B, H, L] for ``keys`` alone) in
    the pool's own buffer; returns a zero-valued int32 [1] for the readers to
    depend on. Keys and values are read where they lie: no concatenation.

    A scatter (``pool[rows] = fresh``) makes a new pool array, which reuses the
    old buffer only when nothing else holds it: while the step before is still
    on the device it does, and MLX then copies the whole pool. So a step issued
    by scatter must wait for the one before; one issued by this kernel need not.
    Steps run in issue order on the stream, so step n+1 writes after step n has
    read. Within a step, MLX sees the write as a reader of the pool: a reader
    must take the returned array as an input (``LayerCache`` adds it to its read
    rows, ``paged_decode_attention`` takes it as ``after``), or MLX may run it
    before, or beside, the write."""
    entries = 1 if values is None else 2
    if pool.ndim != 2 or keys.ndim != 4 \
            or rows.shape != (entries * keys.shape[0], *keys.shape[1:3]):
        raise ValueError("write_in_place: a pool [rows, D], keys [B, H, L, D] and "
                         "rows [entries * B, H, L]")
    threads = 256
    total = entries * keys.size
    return _write_kernel()(
        inputs=[pool, rows, keys, keys if values is None else values],
        template=[("P", pool.dtype), ("E", entries)],
        grid=(-(-total // threads) * threads, 1, 1),
        threadgroup=(threads, 1, 1),
        output_shapes=[(1,)],
        output_dtypes=[mx.int32],
    )[0]


@functools.cache
def constant(value: float, dtype=mx.float32) -> mx.array:
    """A one-value array, made once: a kernel's scalar input."""
    return mx.array([value], dtype=dtype)


def paged_decode_attention(queries, pool, read_rows, offsets, scale: float,
                           window: int | None = None, sinks: mx.array | None = None,
                           after: mx.array | None = None, key_per_lane: bool | None = None):
    """``queries`` [B, Hq, 1, D]; ``pool`` [rows, D]; ``read_rows`` [2B, Hkv, S] pool rows
    of each key position, then each value position; ``offsets`` [B] int32, the
    position of each query (its context: ``offsets + 1`` keys) -> [B, Hq, 1, D].
    ``after``: an array the kernel runs after (``write_in_place``'s output).
    ``key_per_lane``: each lane scores its own key, 32 at a time per warp
    (``VLLM_METAL_PAGED_ATTENTION_KEY_PER_LANE`` by default), instead of each warp
    one key at a time."""
    B, heads, _, head_dim = queries.shape
    if pool.ndim != 2 or read_rows.dtype != mx.int32 or offsets.dtype != mx.int32:
        raise ValueError("paged_decode_attention: pool [rows, D], int32 rows and offsets")
    if key_per_lane is None:
        key_per_lane = envs.VLLM_METAL_PAGED_ATTENTION_KEY_PER_LANE
    threads = 32 * WARPS
    return _kernel()(
        inputs=[queries, pool, read_rows, offsets, constant(float(scale)),
                sinks if sinks is not None else constant(0.0, pool.dtype),
                after if after is not None else constant(0, mx.int32)],
        template=[("P", pool.dtype), ("D", head_dim), ("WINDOW", window or 0),
                  ("SINKS", sinks is not None), ("WARPS", WARPS),
                  ("KEY_PER_LANE", bool(key_per_lane))],
        grid=(B * heads * threads, 1, 1),
        threadgroup=(threads, 1, 1),
        output_shapes=[(B, heads, 1, head_dim)],
        output_dtypes=[pool.dtype],
    )[0]


def reference_decode_attention(queries, pool, read_rows, offsets, scale: float,
                               window: int | None = None, sinks: mx.array | None = None,
                               after: mx.array | None = None):
    """What ``paged_decode_attention`` computes, in MLX's own operations (the
    plain path's gather and mask): the kernel's specification in the tests."""
    keys, values = mx.split(pool[read_rows], 2)
    position = mx.arange(read_rows.shape[-1])[None, :]
    length = (offsets + 1)[:, None]
    allowed = position < length
    if window:
        allowed = allowed & (position >= length - window)
    return mx.fast.scaled_dot_product_attention(queries, keys, values, scale=scale,
                                                mask=allowed[:, None, None, :], sinks=sinks)
