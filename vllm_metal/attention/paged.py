"""Paged KV cache in MLX arrays, addressed by vLLM's block tables.

Each layer owns a key pool and a value pool of shape
``[num_blocks * kv_heads * block_size, head_dim]``: block ``b`` holds, for each
KV head ``h``, its ``block_size`` positions in the consecutive rows from
``(b * kv_heads + h) * block_size``. Reading whole blocks in that order gives
the ``[B, kv_heads, S, head_dim]`` layout attention wants without a transposing
copy (on MLX's CPU device such a copy cost more than the attention itself).
Block 0 is vLLM's null block, never handed to a request: padded query positions
write there and padded key positions read from there (always masked out).

A forward pass runs a group of requests as a right-padded ``[B, L]`` batch.
``BatchPlan`` turns the group's block tables and positions into row indices and
a mask once; ``LayerCache`` is the per-layer view that mlx-lm's attention
modules call (``offset``, ``update_and_fetch``, ``make_mask``), so the models
run unchanged on the paged cache.
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


@dataclass
class BatchPlan:
    """Where one padded group of requests reads and writes the cache."""

    offsets: mx.array  # [B] position of each request's first new token
    write_rows: mx.array  # [B * H * L] pool row of each (padded) new token, per KV head
    read_blocks: mx.array  # [B, H, num_blocks_read] block-head index, block * H + head
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
        heads = np.arange(num_kv_heads)[None, :, None]

        query_pos = start[:, None] + np.arange(L)[None, :]
        padded = np.arange(L)[None, :] >= qlens[:, None]
        block_idx = np.minimum(query_pos // block_size, tables.shape[1] - 1)
        write_block = np.where(padded, NULL_BLOCK, tables[np.arange(B)[:, None], block_idx])
        write_offset = np.where(padded, 0, query_pos % block_size)
        write = (write_block[:, None, :] * num_kv_heads + heads) * block_size + write_offset[:, None, :]

        num_read = -(-S // block_size)
        read = np.zeros((B, num_read), dtype=np.int64)
        width = min(num_read, tables.shape[1])
        read[:, :width] = tables[:, :width]
        read[np.arange(num_read)[None, :] * block_size >= ctx[:, None]] = NULL_BLOCK

        return cls(
            offsets=mx.array(start.astype(np.int32)),
            write_rows=mx.array(write.reshape(-1).astype(np.int32)),
            read_blocks=mx.array((read[:, None, :] * num_kv_heads + heads).astype(np.int32)),
            query_pos=query_pos,
            context_lens=ctx,
            grouped_mask=grouped_mask,
            _masks={},
        )

    def mask(self, window_size: int | None = None) -> mx.array | None:
        if window_size not in self._masks:
            self._masks[window_size] = self._make_mask(window_size)
        return self._masks[window_size]

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
    """mlx-lm's cache protocol for one layer, backed by the paged pools."""

    def __init__(self, cache: PagedKVCache, layer: int, plan: BatchPlan):
        self.cache = cache
        self.layer = layer
        self.plan = plan

    @property
    def offset(self) -> mx.array:
        return self.plan.offsets

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        """``keys``/``values``: [B, H, L, D] -> the context's [B, H, S, D]."""
        c, i = self.cache, self.layer
        c.keys[i] = self._write(c.keys[i], keys)
        c.values[i] = self._write(c.values[i], values)
        return self._read(c.keys[i]), self._read(c.values[i])

    def _write(self, pool: mx.array, new: mx.array) -> mx.array:
        pool[self.plan.write_rows] = new.reshape(-1, new.shape[-1])
        return pool

    def _read(self, pool: mx.array) -> mx.array:
        B, H, num_read = self.plan.read_blocks.shape
        bs, D = self.cache.block_size, pool.shape[-1]
        blocks = pool.reshape(-1, bs, D)[self.plan.read_blocks]  # [B, H, num_read, bs, D]
        return blocks.reshape(B, H, num_read * bs, D)[:, :, : int(self.plan.context_lens.max())]

    def make_mask(self, N: int, return_array: bool = False, window_size: int | None = None):
        mask = self.plan.mask(window_size)
        if mask is None and return_array:
            B, L = self.plan.query_pos.shape
            return mx.ones((B, 1, L, int(self.plan.context_lens.max())), dtype=mx.bool_)
        return mask

    def is_trimmable(self) -> bool:
        return False

    @property
    def state(self):
        raise NotImplementedError("the paged KV cache cannot be serialized")
