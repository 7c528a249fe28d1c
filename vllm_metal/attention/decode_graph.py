"""Decode steps as compiled MLX graphs.

A decode step (one new token per request) builds the same graph every time up
to its shapes. ``mx.compile`` traces it once per shape and replays it, which
cuts the host's cost of building and issuing a step: Python runs no model code,
and MLX fuses elementwise chains. Shapes are bucketed (batch rows and blocks
read, each to a power of two) so a handful of traces serve a whole run. Padded
rows write to and read from the null block and are dropped; keys past a
request's context are hidden by the mask, never sliced off (a slice would give
every step a new shape).

``--enforce-eager`` turns this off: every step then runs through ``BatchPlan``
and ``LayerCache`` as prefill chunks always do.
"""

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from vllm_metal.attention.paged import NULL_BLOCK, PagedKVCache


def bucket(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


@dataclass
class DecodeInputs:
    """One decode step's addresses, padded to its bucket."""

    offsets: mx.array  # [Bp] position of each row's new token
    write_rows: mx.array  # [Bp * H] pool row of each new key/value, per KV head
    read_blocks: mx.array  # [Bp, H, Np] block-head index, block * H + head
    masks: list[mx.array]  # one per window: [Bp, 1, 1, Np * block_size] (one more axis: grouped)


class DecodeGraphs:
    def __init__(self, model, kv_cache: PagedKVCache, windows: list[int | None], grouped_mask: bool):
        self.model = model
        self.kv = kv_cache
        # None too: mlx-lm builds a plain causal mask before the layers ask for theirs.
        self.windows = sorted(set(windows) | {None}, key=lambda w: -1 if w is None else w)
        self.grouped_mask = grouped_mask
        self._step = mx.compile(self._forward)

    def logits(self, tokens: mx.array, block_tables: np.ndarray, positions: np.ndarray) -> mx.array:
        """``tokens`` [B, 1]; ``positions`` [B] of those tokens -> logits [B, vocab]."""
        batch = len(positions)
        rows = bucket(batch)
        if rows > batch:
            tokens = mx.concatenate([tokens, mx.zeros((rows - batch, 1), tokens.dtype)])
        inputs = self._inputs(block_tables, positions, rows)
        kv = self.kv
        logits, kv.keys, kv.values = self._step(
            tokens, inputs.offsets, inputs.write_rows, inputs.read_blocks, inputs.masks,
            kv.keys, kv.values)
        return logits[:batch] if rows > batch else logits

    def _inputs(self, block_tables: np.ndarray, positions: np.ndarray, rows: int) -> DecodeInputs:
        kv, bs, heads = self.kv, self.kv.block_size, self.kv.num_kv_heads
        batch = len(positions)
        pos = np.zeros(rows, np.int64)
        pos[:batch] = positions
        num_read = bucket(int(pos.max()) // bs + 1)
        tables = np.full((rows, num_read), NULL_BLOCK, np.int64)
        width = min(num_read, block_tables.shape[1])
        tables[:batch, :width] = block_tables[:, :width]
        tables[np.arange(num_read)[None, :] * bs > pos[:, None]] = NULL_BLOCK
        write_block = tables[np.arange(rows), pos // bs]
        head = np.arange(heads)
        write = ((write_block[:, None] * heads + head[None, :]) * bs + (pos % bs)[:, None])
        read = tables[:, None, :] * heads + head[None, :, None]
        key_pos = np.arange(num_read * bs)[None, :]
        masks = []
        for window in self.windows:
            allowed = key_pos <= pos[:, None]
            if window is not None:
                allowed &= key_pos > pos[:, None] - window
            shape = (rows, 1, 1, 1, -1) if self.grouped_mask else (rows, 1, 1, -1)
            masks.append(mx.array(allowed.reshape(shape)))
        return DecodeInputs(
            offsets=mx.array(pos.astype(np.int32)),
            write_rows=mx.array(write.reshape(-1).astype(np.int32)),
            read_blocks=mx.array(read.astype(np.int32)),
            masks=masks,
        )

    def _forward(self, tokens, offsets, write_rows, read_blocks, masks, keys, values):
        pools = _Pools(list(keys), list(values))
        masks_by_window = dict(zip(self.windows, masks))
        views = [_DecodeLayerCache(pools, i, offsets, write_rows, read_blocks, masks_by_window,
                                   self.kv.block_size)
                 for i in range(len(keys))]
        hidden = self.model.hidden_states(tokens, views)
        return self.model.logits(hidden[:, -1]), pools.keys, pools.values


@dataclass
class _Pools:
    keys: list
    values: list


class _DecodeLayerCache:
    """mlx-lm's cache protocol for one layer inside the traced decode step."""

    def __init__(self, pools, layer, offsets, write_rows, read_blocks, masks, block_size):
        self.pools = pools
        self.layer = layer
        self.offset = offsets
        self.write_rows = write_rows
        self.read_blocks = read_blocks
        self.masks = masks
        self.block_size = block_size

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        i = self.layer
        if self.pools.keys[i] is None:
            raise RuntimeError(f"layer {i} has no KV pool on this rank")
        self.pools.keys[i] = self._write(self.pools.keys[i], keys)
        self.pools.values[i] = self._write(self.pools.values[i], values)
        return self._read(self.pools.keys[i]), self._read(self.pools.values[i])

    def _write(self, pool: mx.array, new: mx.array) -> mx.array:
        pool[self.write_rows] = new.reshape(-1, new.shape[-1])
        return pool

    def _read(self, pool: mx.array) -> mx.array:
        rows, heads, num_read = self.read_blocks.shape
        head_dim = pool.shape[-1]
        blocks = pool.reshape(-1, self.block_size, head_dim)[self.read_blocks]
        return blocks.reshape(rows, heads, num_read * self.block_size, head_dim)

    def make_mask(self, N: int, return_array: bool = False, window_size: int | None = None):
        # A window mlx-lm asks for on its own (Gemma 3) is overridden per layer
        # (OwnWindowLayer), which asks for the windows this step was given.
        return self.masks.get(window_size, self.masks[None])

    def is_trimmable(self) -> bool:
        return False
