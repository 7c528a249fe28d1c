"""A decode step's whole attention, from the fused q/k/v projection to the
input of the output projection, as one CUDA kernel.

mlx-lm's attention module spends about fifteen primitives of a decode step
between its projections: a split, reshapes and transposes, the q and k norms
(Qwen3), two rotary embeddings, the KV cache write, attention, and the
transpose and reshape back. On MLX's CUDA build the host's cost of issuing
primitives limits a decode step (``benchmarks/issue_cost.py``), so this kernel
does all of it: one thread block per (request, query head) reads its query and
its group's key and value from the projection's output, normalizes and rotates
them, rounds the key and value as the pool keeps them (the group's first head
writes them to the pool, in place), and attends over the request's earlier
positions in the pool and this position's key and value from shared memory,
32 keys at a time per warp (a key per lane). It writes [B, 1, Hq * D], the
layout the output projection reads.

Rotary embeddings are given as each pair's angle per position (``inv_freq``),
read off the model's own rotary module by ``rotary_frequencies``, which also
checks that the module computes exactly that rotation. ``reference`` computes
the same in MLX's own operations: the kernel's specification in the tests.
"""

import functools

import mlx.core as mx

from vllm_metal import envs
from vllm_metal.attention.decode_kernel import (ADD_VALUES, CHUNK_SOFTMAX, MERGE_WARPS, SCORE_KEY,
                                                WARPS, constant)

_SOURCE = """
    constexpr int PER = D / 32;
    constexpr int HALF = D / 2;
    constexpr int GROUP = HQ / HKV;
    constexpr int VEC = 16 / sizeof(P);
    const float neg_inf = __int_as_float(0xff800000);
    const int B = offsets_shape[0];
    const int S = read_rows_shape[2];
    const int b = blockIdx.x / HQ;
    const int h = blockIdx.x % HQ;
    const int kvh = h / GROUP;
    const int lane = threadIdx.x % 32;
    const int warp = threadIdx.x / 32;
    const int pos = offsets[b];
    const long token = (long)b * (HQ + 2 * HKV) * D;

    __shared__ float q_all[D];
    __shared__ float k_new[D];
    __shared__ float v_new[D];
    __shared__ float norms[2];
    for (int i = threadIdx.x; i < D; i += blockDim.x) {
        q_all[i] = static_cast<float>(qkv[token + (long)h * D + i]);
        k_new[i] = static_cast<float>(qkv[token + (long)(HQ + kvh) * D + i]);
        v_new[i] = static_cast<float>(qkv[token + (long)(HQ + HKV + kvh) * D + i]);
    }
    __syncthreads();
    if (QK_NORM) {
        if (warp < 2) {  // warp 0: the query's norm, warp 1: the key's
            const float* vec = warp == 0 ? q_all : k_new;
            float squares = 0.f;
            for (int i = lane; i < D; i += 32) squares += vec[i] * vec[i];
            for (int o = 16; o > 0; o >>= 1) squares += __shfl_xor_sync(0xffffffff, squares, o);
            if (lane == 0) norms[warp] = rsqrtf(squares / D + eps[0]);
        }
        __syncthreads();
        for (int i = threadIdx.x; i < D; i += blockDim.x) {
            q_all[i] *= norms[0] * static_cast<float>(q_norm[i]);
            k_new[i] *= norms[1] * static_cast<float>(k_norm[i]);
        }
        __syncthreads();
    }
    for (int i = threadIdx.x; i < HALF; i += blockDim.x) {
        float sine, cosine;
        sincosf(pos * inv_freq[i], &sine, &cosine);
        const int first = TRADITIONAL ? 2 * i : i;
        const int second = TRADITIONAL ? 2 * i + 1 : i + HALF;
        float x1 = q_all[first], x2 = q_all[second];
        q_all[first] = x1 * cosine - x2 * sine;
        q_all[second] = x1 * sine + x2 * cosine;
        x1 = k_new[first];
        x2 = k_new[second];
        k_new[first] = x1 * cosine - x2 * sine;
        k_new[second] = x1 * sine + x2 * cosine;
    }
    __syncthreads();
    // This position's key and value as the pool keeps them; the group's first head
    // writes them there for later steps (no block of this step reads them back).
    const float scale = scale_arr[0];
    for (int i = threadIdx.x; i < D; i += blockDim.x) {
        const P key = static_cast<P>(k_new[i]);
        const P value = static_cast<P>(v_new[i]);
        if (WRITE && h % GROUP == 0) {
            P* target = const_cast<P*>(pool);
            target[(long)write_rows[(long)b * HKV + kvh] * D + i] = key;
            target[(long)write_rows[(long)(B + b) * HKV + kvh] * D + i] = value;
        }
        if (!WRITE && h % GROUP == 0) {
            new_keys[((long)b * HKV + kvh) * D + i] = key;
            new_values[((long)b * HKV + kvh) * D + i] = value;
        }
        k_new[i] = static_cast<float>(key);
        v_new[i] = static_cast<float>(value);
        q_all[i] *= scale;
    }
    __syncthreads();
    float own = 0.f;  // this position's score, known to every lane
    for (int i = lane; i < D; i += 32) own += q_all[i] * k_new[i];
    for (int o = 16; o > 0; o >>= 1) own += __shfl_xor_sync(0xffffffff, own, o);

    const int* key_rows = read_rows + ((long)b * HKV + kvh) * S;
    const int* value_rows = read_rows + ((long)(B + b) * HKV + kvh) * S;
    // Warp 0 starts from this position (score and value from shared memory); the
    // warps then take the earlier positions from the pool, so their value loop has
    // no branch and keeps several rows' loads in flight.
    float m = warp == 0 ? own : neg_inf;
    float l = warp == 0 ? 1.f : 0.f;
    float acc[PER];
    for (int i = 0; i < PER; ++i) acc[i] = warp == 0 ? v_new[lane * PER + i] : 0.f;
    const int end = pos;
    for (int base = warp * 32; base < end; base += WARPS * 32) {
        const int j = base + lane;
        const bool valid = j < end;
        float s = neg_inf;
        int value_row = 0;
        if (valid) {
            const long key_row = key_rows[j];
            value_row = value_rows[j];
""" + SCORE_KEY + """
        }
""" + CHUNK_SOFTMAX + ADD_VALUES + """
        m = m_new;
    }

    const float sink = neg_inf;  // no attention sinks in these models
""" + MERGE_WARPS + """"""


@functools.cache
def _kernel():
    return mx.fast.cuda_kernel(
        name="vllm_metal_fused_decode_attention",
        input_names=["qkv", "q_norm", "k_norm", "eps", "inv_freq", "offsets", "pool",
                     "write_rows", "read_rows", "scale_arr"],
        output_names=["out", "new_keys", "new_values"],
        source=_SOURCE,
        ensure_row_contiguous=True,  # all packed already; the pool must never be a copy
    )


# Few blocks (a request's heads at batch 1) each take 32 warps, more blocks 16 (H200,
# benchmarks/attention_kernels: Llama-3-8B's heads at batch 1, 8 and 12 and contexts of
# 128 and 1024, each of 16 and 32 warps 1.5-5x faster than 4; 32 ahead at batch 1).
MANY_WARPS_BLOCKS = 64


def warps_for(batch: int, heads: int) -> int:
    """A block's warps for a decode step of ``batch`` requests of ``heads`` query
    heads (a block each): ``VLLM_METAL_ATTENTION_WARPS`` where given; else 32 where
    the blocks are too few to fill the GPU with 16, 16 otherwise."""
    return envs.VLLM_METAL_ATTENTION_WARPS or (32 if batch * heads <= MANY_WARPS_BLOCKS else 16)


def fused_decode_attention(qkv, pool, offsets, write_rows, read_rows, heads: int, kv_heads: int,
                           scale: float, inv_freq: mx.array, traditional: bool, q_norm=None,
                           k_norm=None, eps: float = 0.0, write: bool = True,
                           warps: int = WARPS):
    """``qkv`` [B, 1, (heads + 2 kv_heads) D]; ``pool`` [rows, D]; ``offsets`` [B] int32,
    each request's position; ``write_rows`` [2B, kv_heads, 1] and ``read_rows`` [2B,
    kv_heads, S] int32 pool rows (keys', then values'); ``inv_freq`` [D / 2] float32.
    Returns the attention [B, 1, heads D] and, where ``write`` is False (the caller
    writes them), this position's keys and values [B, kv_heads, 1, D]. ``warps``: a
    block's warps, each taking 32 positions at a time (``benchmarks/attention_kernels``
    compares them)."""
    if not 1 <= warps <= 32:
        raise ValueError(f"{warps} warps a block: CUDA blocks hold 1 to 32")
    batch = qkv.shape[0]
    head_dim = pool.shape[-1]
    threads = 32 * warps
    out, keys, values = _kernel()(
        inputs=[qkv, q_norm if q_norm is not None else constant(0.0, pool.dtype),
                k_norm if k_norm is not None else constant(0.0, pool.dtype), constant(eps),
                inv_freq, offsets, pool, write_rows, read_rows, constant(scale)],
        template=[("P", pool.dtype), ("D", head_dim), ("HQ", heads), ("HKV", kv_heads),
                  ("QK_NORM", q_norm is not None), ("TRADITIONAL", traditional),
                  ("WRITE", write), ("WARPS", warps)],
        grid=(batch * heads * threads, 1, 1),
        threadgroup=(threads, 1, 1),
        output_shapes=[(batch, 1, heads * head_dim)] + [(batch, kv_heads, 1, head_dim)] * 2,
        output_dtypes=[pool.dtype] * 3,
    )
    return out if write else (out, keys, values)


def rotate(x: mx.array, positions: mx.array, inv_freq: mx.array, traditional: bool) -> mx.array:
    """``x`` [B, H, 1, D] rotated at ``positions`` [B]: each pair by position x inv_freq."""
    angles = positions.astype(mx.float32)[:, None, None, None] * inv_freq
    cos, sin = mx.cos(angles), mx.sin(angles)
    if traditional:
        first, second = x[..., 0::2], x[..., 1::2]
    else:
        first, second = mx.split(x, 2, axis=-1)
    one, two = first * cos - second * sin, first * sin + second * cos
    if traditional:
        return mx.stack([one, two], axis=-1).reshape(x.shape)
    return mx.concatenate([one, two], axis=-1)


def reference(qkv, pool, offsets, read_rows, heads: int, kv_heads: int, scale: float,
              inv_freq, traditional: bool, q_norm=None, k_norm=None, eps: float = 0.0):
    """What ``fused_decode_attention`` computes, in MLX's own operations: (the
    attention [B, 1, heads D], this position's keys and values [B, kv_heads, 1, D]
    in the pool's type). The context is read from ``pool`` except at each request's
    own position, which takes its new key and value."""
    batch, head_dim = qkv.shape[0], pool.shape[-1]
    x = qkv.astype(mx.float32).reshape(batch, heads + 2 * kv_heads, 1, head_dim)
    queries, keys, values = mx.split(x, [heads, heads + kv_heads], axis=1)
    if q_norm is not None:
        queries = mx.fast.rms_norm(queries, q_norm.astype(mx.float32), eps)
        keys = mx.fast.rms_norm(keys, k_norm.astype(mx.float32), eps)
    queries = rotate(queries, offsets, inv_freq, traditional)
    keys = rotate(keys, offsets, inv_freq, traditional).astype(pool.dtype)
    values = values.astype(pool.dtype)
    context_keys, context_values = mx.split(pool[read_rows], 2)
    own = (mx.arange(read_rows.shape[-1])[None, :] == offsets[:, None])[:, None, :, None]
    context_keys = mx.where(own, keys, context_keys).astype(mx.float32)
    context_values = mx.where(own, values, context_values).astype(mx.float32)
    allowed = (mx.arange(read_rows.shape[-1])[None, :] <= offsets[:, None])[:, None, None, :]
    out = mx.fast.scaled_dot_product_attention(queries, context_keys, context_values,
                                               scale=scale, mask=allowed)
    out = out.transpose(0, 2, 1, 3).reshape(batch, 1, heads * head_dim).astype(pool.dtype)
    return out, keys, values
