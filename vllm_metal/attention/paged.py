"""Paged KV cache in MLX arrays, addressed by vLLM's block tables.

Each layer owns a key pool and a value pool of shape
``[num_blocks * block_size + 1, kv_heads, head_dim]``: slot ``b * block_size + i``
holds position ``i`` of block ``b``; the last slot is scratch, written by padded
query positions and read by padded key positions (always masked out).

A forward pass runs a group of requests as a right-padded ``[B, L]`` batch.
``BatchPlan`` turns the group's block tables and positions into slot indices and
a mask once; ``LayerCache`` is the per-layer view that mlx-lm's attention
modules call (``offset``, ``update_and_fetch``, ``make_mask``), so the models
run unchanged on the paged cache.
"""

from dataclasses import dataclass

import mlx.core as mx
import numpy as np


class PagedKVCache:
    def __init__(self, num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype,
                 own_layers=None):
        """``own_layers``: the layers this rank runs (a pipeline stage); others get no pool."""
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.scratch_slot = num_blocks * block_size
        shape = (self.scratch_slot + 1, num_kv_heads, head_dim)
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
    write_slots: mx.array  # [B * L] slot of each (padded) new token
    read_slots: mx.array  # [B, S] slot of each (padded) context position
    query_pos: np.ndarray  # [B, L] absolute position of each query
    context_lens: np.ndarray  # [B] tokens of context after this step
    grouped_mask: bool  # mask shaped [B, 1, 1, L, S] for grouped-query scores
    default_window: int | None  # applied where the model asks for a plain causal mask
    _masks: dict

    @classmethod
    def build(cls, block_tables, start_positions, query_lens, block_size, scratch_slot,
              grouped_mask=False, default_window=None):
        """``block_tables``: [B, max_blocks] int; positions and lengths: [B] int."""
        start = np.asarray(start_positions, dtype=np.int64)
        qlens = np.asarray(query_lens, dtype=np.int64)
        ctx = start + qlens
        B, L, S = len(qlens), int(qlens.max()), int(ctx.max())

        query_pos = start[:, None] + np.arange(L)[None, :]
        write = _slots(block_tables, query_pos, block_size)
        write[np.arange(L)[None, :] >= qlens[:, None]] = scratch_slot

        key_pos = np.broadcast_to(np.arange(S)[None, :], (B, S))
        read = _slots(block_tables, key_pos, block_size)
        read[key_pos >= ctx[:, None]] = scratch_slot

        return cls(
            offsets=mx.array(start.astype(np.int32)),
            write_slots=mx.array(write.reshape(-1).astype(np.int32)),
            read_slots=mx.array(read.astype(np.int32)),
            query_pos=query_pos,
            context_lens=ctx,
            grouped_mask=grouped_mask,
            default_window=default_window,
            _masks={},
        )

    def mask(self, window_size: int | None = None) -> mx.array | None:
        window_size = window_size or self.default_window
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


def _slots(block_tables, positions, block_size):
    positions = np.asarray(positions)
    rows = np.arange(positions.shape[0])[:, None]
    block_idx = np.minimum(positions // block_size, block_tables.shape[1] - 1)
    return block_tables[rows, block_idx].astype(np.int64) * block_size + positions % block_size


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
        B, H, L, D = keys.shape
        c, i, plan = self.cache, self.layer, self.plan
        c.keys[i][plan.write_slots] = keys.transpose(0, 2, 1, 3).reshape(B * L, H, D)
        c.values[i][plan.write_slots] = values.transpose(0, 2, 1, 3).reshape(
            B * L, H, values.shape[-1]
        )
        # Contiguous [B, H, S, D]: MLX's CPU attention reads a transposed gather
        # about 3x slower than copying it first (measured at 0.6B decode shapes).
        return (
            mx.contiguous(c.keys[i][plan.read_slots].transpose(0, 2, 1, 3)),
            mx.contiguous(c.values[i][plan.read_slots].transpose(0, 2, 1, 3)),
        )

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
