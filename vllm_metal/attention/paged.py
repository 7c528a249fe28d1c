"""Paged KV cache in MLX arrays, addressed by vLLM's block tables.

Each layer owns a key pool and a value pool of shape
``[num_blocks * kv_heads * block_size, head_dim]``: block ``b`` holds, for each
KV head ``h``, its ``block_size`` positions in the consecutive rows from
``(b * kv_heads + h) * block_size``. A step writes its new keys with one scatter
to a ``[B, kv_heads, L]`` array of rows, and reads the context with one gather
of a ``[B, kv_heads, S]`` array of rows, which gives the ``[B, kv_heads, S,
head_dim]`` layout attention wants with no transposing copy (on MLX's CPU device
such a copy cost more than the attention itself) and no reshapes: every layer's
read and write is two primitives each, and the row arrays are built once a step.
Block 0 is vLLM's null block, never handed to a request: padded query positions
write there and padded key positions read from there (always masked out).

A forward pass runs a group of requests as a right-padded ``[B, L]`` batch.
``BatchPlan`` turns the group's block tables and positions into rows and a mask
once; ``LayerCache`` is the per-layer view that mlx-lm's attention modules call
(``offset``, ``update_and_fetch``, ``make_mask``), so the models run unchanged
on the paged cache. The compiled decode step (``decode_graph``) uses the same
``LayerCache`` with its own plan.
"""

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

NULL_BLOCK = 0


class PagedKVCache:
    def __init__(self, num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype,
                 own_layers=None):
        """``own_layers``: the layers this rank runs (a pipeline stage); others get no pool."""
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.num_kv_heads = num_kv_heads
        shape = (num_blocks * num_kv_heads * block_size, head_dim)
        own = set(range(num_layers) if own_layers is None else own_layers)
        self.keys = [mx.zeros(shape, dtype=dtype) if i in own else None for i in range(num_layers)]
        self.values = [mx.zeros(shape, dtype=dtype) if i in own else None
                       for i in range(num_layers)]
        mx.eval([k for k in self.keys if k is not None], [v for v in self.values if v is not None])

    @staticmethod
    def bytes_per_block(num_layers, block_size, num_kv_heads, head_dim, itemsize) -> int:
        return 2 * num_layers * block_size * num_kv_heads * head_dim * itemsize

    def layer_views(self, plan: "BatchPlan") -> list["LayerCache"]:
        return [LayerCache(self, i, plan) for i in range(len(self.keys))]


def block_rows(tables: np.ndarray, num_kv_heads: int, block_size: int) -> np.ndarray:
    """Block ids ``[B, n]`` -> ``[B, kv_heads, n]``: the first pool row of each block's head."""
    heads = np.arange(num_kv_heads)[None, :, None]
    return (tables[:, None, :] * num_kv_heads + heads) * block_size


def key_rows(first_rows: mx.array, block_size: int) -> mx.array:
    """``[B, H, n]`` first rows of the blocks read -> ``[B, H, n * block_size]``: the
    pool row of every key position (built once a step, for all layers)."""
    B, H, n = first_rows.shape
    offsets = mx.arange(block_size, dtype=first_rows.dtype)
    return (first_rows[..., None] + offsets).reshape(B, H, n * block_size)


def write_index(rows: np.ndarray) -> mx.array:
    """Pool rows ``[B, H, L]`` of the new keys, less leading axes of length 1.

    Assigning mlx-lm's ``[B, H, L, D]`` keys to ``pool[index]`` drops the keys'
    leading axes of length 1 and broadcasts them to the index's shape; an index
    of the same leading shape makes that a no-op (one reshape, one scatter).
    """
    lead = 0
    while lead < rows.ndim - 1 and rows.shape[lead] == 1:
        lead += 1
    return mx.array(rows.reshape(rows.shape[lead:]).astype(np.int32))


@dataclass
class BatchPlan:
    """Where one padded group of requests reads and writes the cache."""

    offsets: mx.array  # [B] position of each request's first new token
    write_rows: mx.array  # [B, H, L] pool row of each (padded) new token (see write_index)
    read_rows: mx.array  # [B, H, S] pool row of each key position
    query_pos: np.ndarray  # [B, L] absolute position of each query
    context_lens: np.ndarray  # [B] tokens of context after this step
    grouped_mask: bool  # mask shaped [B, 1, 1, L, S] for grouped-query scores
    _masks: dict

    @classmethod
    def build(cls, block_tables, start_positions, query_lens, block_size, num_kv_heads,
              grouped_mask=False):
        """``block_tables``: [B, max_blocks] int; positions and lengths: [B] int."""
        start = np.asarray(start_positions, dtype=np.int64)
        qlens = np.asarray(query_lens, dtype=np.int64)
        ctx = start + qlens
        B, L, S = len(qlens), int(qlens.max()), int(ctx.max())
        tables = np.asarray(block_tables, dtype=np.int64)

        query_pos = start[:, None] + np.arange(L)[None, :]
        padded = np.arange(L)[None, :] >= qlens[:, None]
        block_idx = np.minimum(query_pos // block_size, tables.shape[1] - 1)
        write_block = np.where(padded, NULL_BLOCK, tables[np.arange(B)[:, None], block_idx])
        write_offset = np.where(padded, 0, query_pos % block_size)
        write = (block_rows(write_block, num_kv_heads, block_size)
                 + write_offset[:, None, :])

        num_read = -(-S // block_size)
        read = np.zeros((B, num_read), dtype=np.int64)
        width = min(num_read, tables.shape[1])
        read[:, :width] = tables[:, :width]
        read[np.arange(num_read)[None, :] * block_size >= ctx[:, None]] = NULL_BLOCK
        rows = key_rows(mx.array(block_rows(read, num_kv_heads, block_size).astype(np.int32)),
                        block_size)

        return cls(
            offsets=mx.array(start.astype(np.int32)),
            write_rows=write_index(write),
            read_rows=rows if S == num_read * block_size else rows[..., :S],
            query_pos=query_pos,
            context_lens=ctx,
            grouped_mask=grouped_mask,
            _masks={},
        )

    def mask(self, window_size: int | None = None) -> mx.array | None:
        if window_size not in self._masks:
            self._masks[window_size] = self._make_mask(window_size)
        return self._masks[window_size]

    def layer_mask(self, window_size: int | None, return_array: bool) -> mx.array | None:
        mask = self.mask(window_size)
        if mask is None and return_array:
            B, L = self.query_pos.shape
            return mx.ones((B, 1, L, int(self.context_lens.max())), dtype=mx.bool_)
        return mask

    def _make_mask(self, window_size):
        B, L = self.query_pos.shape
        if L == 1 and window_size is None and np.all(self.context_lens == self.context_lens[0]):
            return None  # one token per request, equal contexts: nothing to hide
        key_pos = np.arange(int(self.context_lens.max()))[None, None, :]
        q = self.query_pos[:, :, None]
        allowed = (key_pos <= q) & (key_pos < self.context_lens[:, None, None])
        if window_size is not None:
            allowed &= key_pos > q - window_size
        return mx.array(allowed[:, None, None] if self.grouped_mask else allowed[:, None])


class LayerCache:
    """mlx-lm's cache protocol for one layer, backed by the paged pools.

    ``pools``: anything with per-layer ``keys`` and ``values`` lists (the
    ``PagedKVCache``, or the traced pools of a compiled step); ``plan``: a
    ``BatchPlan`` or anything with its ``offsets``, ``write_rows``,
    ``read_rows`` and ``layer_mask``.
    """

    def __init__(self, pools, layer: int, plan):
        self.pools = pools
        self.layer = layer
        self.plan = plan

    @property
    def offset(self) -> mx.array:
        return self.plan.offsets

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        """``keys``/``values``: [B, H, L, D] -> the context's [B, H, S, D]."""
        pools, i, plan = self.pools, self.layer, self.plan
        key_pool, value_pool = pools.keys[i], pools.values[i]
        if key_pool is None:
            raise RuntimeError(f"layer {i} has no KV pool on this rank")
        key_pool[plan.write_rows] = keys
        value_pool[plan.write_rows] = values
        pools.keys[i], pools.values[i] = key_pool, value_pool
        return key_pool[plan.read_rows], value_pool[plan.read_rows]

    def make_mask(self, N: int, return_array: bool = False, window_size: int | None = None):
        return self.plan.layer_mask(window_size, return_array)

    def is_trimmable(self) -> bool:
        return False

    @property
    def state(self):
        raise NotImplementedError("the paged KV cache cannot be serialized")
