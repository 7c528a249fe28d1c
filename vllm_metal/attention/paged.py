"""Paged KV cache in MLX arrays, addressed by vLLM's block tables.

Each layer owns one pool of shape ``[num_blocks * 2 * kv_heads * block_size,
head_dim]`` for its keys and values: block ``b`` holds the ``block_size``
positions of key head ``h`` in the consecutive rows from ``(b * 2 * kv_heads +
h) * block_size``, and those of value head ``h`` ``kv_heads * block_size`` rows
further on. A step writes its new keys and values with one scatter (of the two
stacked) to a ``[2B, kv_heads, L]`` array of rows, and reads the context with one
gather of a ``[2B, kv_heads, S]`` array of rows (keys', then values'), split in
two views of the ``[B, kv_heads, S, head_dim]`` layout attention wants: no
transposing copy (on MLX's CPU device such a copy cost more than the attention
itself) and no reshapes. The row arrays are built once a step, for all layers;
each layer then costs six primitives (concatenate, reshape, scatter, gather,
squeeze, split), where separate key and value pools took eight to ten and
reshaped block-sized gathers sixteen. That host cost per primitive, not the
arithmetic, limits a decode step on a GPU.
Multi-head latent attention (DeepSeek-V3) caches no per-head keys and values
but one row per token: its compressed latent and its rotary key side by side
(``kv_lora_rank + qk_rope_head_dim`` values). Its pool has one entry per token
instead of two (``entries=1``, one "head"), and ``LatentLayerCache`` writes and
reads those rows with the same plans.
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

from vllm_metal.attention import decode_kernel

NULL_BLOCK = 0


class PagedKVCache:
    def __init__(self, num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype,
                 own_layers=None, latent_width=None):
        """``own_layers``: the layers this rank runs (a pipeline stage); others get no pool.
        ``latent_width``: multi-head latent attention, whose rows of ``head_dim``
        values (one "head") hold the latent's ``latent_width`` values, then the
        rotary key's."""
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.num_kv_heads = num_kv_heads
        self.latent_width = latent_width
        self.entries = 1 if latent_width else 2
        shape = (num_blocks * self.entries * num_kv_heads * block_size, head_dim)
        own = set(range(num_layers) if own_layers is None else own_layers)
        self.pools = [mx.zeros(shape, dtype=dtype) if i in own else None
                      for i in range(num_layers)]
        mx.eval([p for p in self.pools if p is not None])

    @staticmethod
    def bytes_per_block(num_layers, block_size, num_kv_heads, head_dim, itemsize,
                        entries=2) -> int:
        return entries * num_layers * block_size * num_kv_heads * head_dim * itemsize

    def layer_cache(self, pools, layer: int, plan) -> "LayerCache":
        if self.latent_width:
            return LatentLayerCache(pools, layer, plan, self.latent_width)
        return LayerCache(pools, layer, plan)

    def layer_views(self, plan: "BatchPlan") -> list["LayerCache"]:
        return [self.layer_cache(self.pools, i, plan) for i in range(len(self.pools))]


def pool_rows(blocks: mx.array, num_kv_heads: int, block_size: int, entries: int = 2,
              within: mx.array | None = None) -> mx.array:
    """Block ids ``[B, n]`` (int32) -> ``[entries * B, kv_heads, n]``: the pool row
    of each block's key head (at ``within`` [B, n] positions into the block; its
    first row by default), then the same for its value head (the layout
    ``concatenate([keys, values])`` has; a latent pool, one entry, has none).

    Built on the device from the block ids: an array the host writes costs the
    device by its bytes (on MLX's CUDA build its pages move at the first read;
    ``benchmarks.host_inputs``), and the rows are ``entries * kv_heads`` times as many."""
    heads = mx.arange(num_kv_heads, dtype=mx.int32)[None, :, None]
    keys = (blocks[:, None, :] * (entries * num_kv_heads) + heads) * block_size
    if within is not None:
        keys = keys + within[:, None, :]
    if entries == 1:
        return keys
    return mx.concatenate([keys, keys + num_kv_heads * block_size])


def allowed_keys(query_pos: mx.array, num_keys: int, window_size: int | None, grouped: bool,
                 context_lens: mx.array | None = None) -> mx.array:
    """Query positions ``[B, L]`` -> the mask ``[B, 1, L, num_keys]`` (grouped:
    ``[B, 1, 1, L, num_keys]``) of the keys each query sees: up to its own
    position, none from ``context_lens`` [B] on, the last ``window_size`` only
    where given. Built on the device from positions: a prefill's mask is L x S
    bytes a request, which the host would otherwise write."""
    key_pos = mx.arange(num_keys, dtype=mx.int32)[None, None, :]
    q = query_pos[:, :, None]
    allowed = key_pos <= q
    if context_lens is not None:
        allowed = allowed & (key_pos < context_lens[:, None, None])
    if window_size is not None:
        allowed = allowed & (key_pos > q - window_size)
    return allowed[:, None, None] if grouped else allowed[:, None]


def _int32(values: np.ndarray) -> mx.array:
    return mx.array(values.astype(np.int32))


def position_rows(first_rows: mx.array, block_size: int, num_keys: int | None = None):
    """``[2B, H, n]`` first rows of the blocks read -> the pool row ``[2B, H,
    num_keys]`` (all ``n * block_size`` by default) of every position. Built on
    the device once a step, for all layers."""
    B, H, n = first_rows.shape
    offsets = mx.arange(block_size, dtype=first_rows.dtype)
    rows = (first_rows[..., None] + offsets).reshape(B, H, n * block_size)
    if num_keys is not None and num_keys < n * block_size:
        rows = rows[..., :num_keys]
    return rows


@dataclass
class BatchPlan:
    """Where one padded group of requests reads and writes the cache."""

    offsets: mx.array  # [B] position of each request's first new token
    write_rows: mx.array  # [2B, H, L] pool row of each (padded) new key, then value ([B, 1, L]: latent)
    read_rows: mx.array  # [2B, H, S] pool row of each key position, then value position
    query_pos: np.ndarray  # [B, L] absolute position of each query (a padded one: its row's last)
    context_lens: np.ndarray  # [B] tokens of context after this step
    grouped_mask: bool  # mask shaped [B, 1, 1, L, S] for grouped-query scores
    _masks: dict
    use_kernel: bool = False  # single-query steps' attention by decode_kernel

    @classmethod
    def build(cls, block_tables, start_positions, query_lens, block_size, num_kv_heads,
              grouped_mask=False, entries=2):
        """``block_tables``: [B, max_blocks] int; positions and lengths: [B] int;
        ``entries``: the pool's (``PagedKVCache.entries``)."""
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

        num_read = -(-S // block_size)
        read = np.zeros((B, num_read), dtype=np.int64)
        width = min(num_read, tables.shape[1])
        read[:, :width] = tables[:, :width]
        read[np.arange(num_read)[None, :] * block_size >= ctx[:, None]] = NULL_BLOCK
        first_rows = pool_rows(_int32(read), num_kv_heads, block_size, entries)

        return cls(
            offsets=_int32(start),
            write_rows=pool_rows(_int32(write_block), num_kv_heads, block_size, entries,
                                 within=_int32(write_offset)),
            read_rows=position_rows(first_rows, block_size, S),
            # A padded query sees what its row's last query sees, never no key at all (a
            # window ending past the context): where a backend masks with -inf, such a
            # softmax writes NaN to the null block, which other rows read masked out
            # (0 x NaN). MLX's CPU attention masks with a finite minimum.
            query_pos=np.minimum(query_pos, ctx[:, None] - 1),
            context_lens=ctx,
            grouped_mask=grouped_mask,
            _masks={},
        )

    def mask(self, window_size: int | None = None) -> mx.array | None:
        if window_size not in self._masks:
            self._masks[window_size] = self._make_mask(window_size)
        return self._masks[window_size]

    def window_of(self, mask) -> tuple[bool, int | None]:
        """Whether ``mask`` is one this plan made, and for which window."""
        return window_of(mask, self._masks)

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
        return allowed_keys(_int32(self.query_pos), int(self.context_lens.max()), window_size,
                            self.grouped_mask, context_lens=_int32(self.context_lens))


class LayerCache:
    """mlx-lm's cache protocol for one layer, backed by the paged pools.

    ``pools``: the per-layer pools (``PagedKVCache.pools``, or the traced pools
    of a compiled step); ``plan``: a
    ``BatchPlan`` or anything with its ``offsets``, ``write_rows``,
    ``read_rows`` and ``layer_mask``.
    """

    def __init__(self, pools, layer: int, plan):
        self.pools = pools
        self.layer = layer
        self.plan = plan
        self.read_rows = plan.read_rows
        self.written = None  # after a write in place: the array its readers depend on

    def _check_pool(self) -> None:
        if self.pools[self.layer] is None:
            raise RuntimeError(f"layer {self.layer} has no KV pool on this rank")

    def _write(self, keys: mx.array, values: mx.array | None = None) -> None:
        """Write this step's keys and values (or, with no ``values``, the rows in
        ``keys`` alone). In place where the plan says so
        (``decode_kernel.write_in_place``), else by a scatter into a new pool array."""
        pools, i, plan = self.pools, self.layer, self.plan
        if getattr(plan, "write_in_place", False):
            self.written = decode_kernel.write_in_place(pools[i], plan.write_rows, keys, values)
            return
        pool = pools[i]
        pool[plan.write_rows] = keys if values is None else mx.concatenate([keys, values])
        pools[i] = pool

    def _gather(self) -> mx.array:
        """This layer's context rows, read after this step's write."""
        rows = self.read_rows if self.written is None else self.read_rows + self.written
        return self.pools[self.layer][rows]

    @property
    def offset(self) -> mx.array:
        return self.plan.offsets

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        """``keys``/``values``: [B, H, L, D] -> the context's [B, H, S, D]."""
        self._check_pool()
        self._write(keys, values)
        keys, values = mx.split(self._gather(), 2)  # views, no copies
        return keys, values

    def make_mask(self, N: int, return_array: bool = False, window_size: int | None = None):
        return self.plan.layer_mask(window_size, return_array)

    def decode_attention(self, queries: mx.array, scale: float, mask, sinks=None):
        """Attention of a single-query step straight from this layer's pool (after
        ``update_and_fetch`` wrote the step's keys), or None where the kernel is
        off or does not cover the step: the caller then attends the plain way."""
        plan, pool = self.plan, self.pools[self.layer]
        if not getattr(plan, "use_kernel", False) or pool is None:
            return None
        if not decode_kernel.covers(queries, pool):
            return None
        known, window = plan.window_of(mask)
        if not known:
            return None
        return decode_kernel.paged_decode_attention(queries, pool, self.read_rows, plan.offsets,
                                                    scale, window, sinks, after=self.written)

    def is_trimmable(self) -> bool:
        return False

    @property
    def state(self):
        raise NotImplementedError("the paged KV cache cannot be serialized")


class LatentLayerCache(LayerCache):
    """The cache protocol of mlx-lm's multi-head latent attention for one layer:
    ``update_and_fetch(latent, rope_keys)`` stores both in one pool row per token."""

    def __init__(self, pools, layer: int, plan, latent_width: int):
        super().__init__(pools, layer, plan)
        self.latent_width = latent_width

    def decode_attention(self, queries, scale, mask, sinks=None):
        return None  # latent attention attends over latents in its own way

    def update_and_fetch(self, latent: mx.array, rope_keys: mx.array):
        """``latent`` [B, 1, L, R], ``rope_keys`` [B, 1, L, P] -> the context's
        [B, 1, S, R] and [B, 1, S, P]."""
        self._check_pool()
        self._write(mx.concatenate([latent, rope_keys], axis=-1))
        context = self._gather()
        return context[..., : self.latent_width], context[..., self.latent_width:]


def window_of(mask, masks: dict) -> tuple[bool, int | None]:
    if mask is None:
        return True, None  # one token per request and equal contexts: no window, no padding
    for window, made in masks.items():
        if made is mask:
            return True, window
    return False, None
