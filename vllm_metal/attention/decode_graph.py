"""Decode steps as compiled MLX graphs.

A decode step (one new token per request) builds the same graph every time up
to its shapes. ``mx.compile`` traces it once per shape and replays it, which
cuts the host's cost of building and issuing a step: Python runs no model code,
and MLX fuses elementwise chains. Shapes are bucketed so a few traces serve a
whole run: batch rows to a power of two; blocks read, where MLX's attention reads
every position it is given (the gathered context), to four buckets an octave (at
most a quarter past the context). Where the attention is a kernel that reads as
far as each request's position (the paged and fused kernels), the blocks read
cost nothing until used: their bucket is a power of two from
``KERNEL_MIN_READ_POSITIONS``, so contexts up to it share one trace per rows
bucket, and ``warm_up`` traces those at startup, before the first request would
wait for them. Padded rows write to and read from the null block and are
dropped; keys past a request's context are hidden by the mask, never sliced off
(a slice would give every step a new shape).

The traced step reads and writes the pools through the same ``LayerCache`` as
eager steps, with a plan of its traced inputs in place of ``BatchPlan``.
``--enforce-eager`` turns this off: every step then runs through ``BatchPlan``
as prefill chunks always do.
"""

import logging
import time
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from vllm_metal.attention import decode_kernel
from vllm_metal.attention.paged import (NULL_BLOCK, PagedKVCache, allowed_keys, pool_rows,
                                       position_rows, window_of)


logger = logging.getLogger("vllm.metal")


# Contexts a kernel-read step's first blocks bucket covers. Its cost is an int32 pool row
# per position, head and key or value built on the device per step (2 MiB at 16 rows
# and 8 heads). The host sends only the blocks a step's contexts reach; the bucket's
# remaining null blocks are padded on the device.
KERNEL_MIN_READ_POSITIONS = 2048


def bucket(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def fine_bucket(n: int) -> int:
    """``n`` rounded up to a power of two up to 8, then to an eighth of the next
    power of two: at most a quarter past ``n``, four buckets an octave."""
    top = bucket(n)
    if top <= 8:
        return top
    step = top // 8
    return -(-n // step) * step


@dataclass
class DecodeInputs:
    """One decode step's addresses, padded to its bucket: all the host sends. The
    pool rows and masks are derived from them on the device, in the traced step."""

    offsets: mx.array  # [Bp] int32 position of each row's new token
    tables: mx.array  # [Bp, Np] int32 blocks read; the null block past each row's position


class DecodeGraphs:
    def __init__(self, model, kv_cache: PagedKVCache, windows: list[int | None], grouped_mask: bool,
                 use_kernel: bool = False, fused_blocks: bool = False):
        self.model = model
        self.use_kernel = use_kernel
        # Pools written in place: a step need not wait for the one before to be
        # issued (``decode_kernel.write_in_place``).
        self.writes_in_place = decode_kernel.writes_in_place(fused_blocks)
        self.kv = kv_cache
        # None too: mlx-lm builds a plain causal mask before the layers ask for theirs.
        self.windows = sorted(set(windows) | {None}, key=lambda w: -1 if w is None else w)
        self.grouped_mask = grouped_mask
        self.min_read_blocks = (bucket(-(-KERNEL_MIN_READ_POSITIONS // kv_cache.block_size))
                                if use_kernel else 1)
        # MLX's attention reads every position it is given (the gathered context):
        # buckets close to the context. A kernel reads to each position: few buckets.
        self.blocks_bucket = bucket if use_kernel else fine_bucket
        self._step = mx.compile(self._forward)
        self.traces: list[tuple[int, int]] = []  # (rows, blocks read) of each trace

    def logits(self, tokens: mx.array, block_tables: np.ndarray, positions: np.ndarray) -> mx.array:
        """``tokens`` [B, 1]; ``positions`` [B] of those tokens -> logits [B, vocab]."""
        traces, start = len(self.traces), time.perf_counter()
        logits = self._logits(tokens, block_tables, positions)
        if len(self.traces) > traces:  # mx.compile ran _forward: a new shape was traced
            logger.info("Decode step traced for %d rows, %d blocks read: %.0f ms on the host "
                        "(its kernels may still compile at their first launch); %d traces so far",
                        *self.traces[-1], 1e3 * (time.perf_counter() - start), len(self.traces))
        return logits

    def _logits(self, tokens: mx.array, block_tables: np.ndarray, positions: np.ndarray):
        batch = len(positions)
        rows = bucket(batch)
        if rows > batch:
            tokens = mx.concatenate([tokens, mx.zeros((rows - batch, 1), tokens.dtype)])
        inputs = self._inputs(block_tables, positions, rows)
        kv = self.kv
        outputs = self._step(tokens, inputs.offsets, inputs.tables, kv.pools)
        logits = outputs[0]
        if not self.writes_in_place:
            kv.pools = outputs[1]
        return logits[:batch] if rows > batch else logits

    def warm_up(self, max_rows: int) -> list[tuple[int, int]]:
        """Trace and run a step of each rows bucket up to ``max_rows``, at the first
        blocks bucket, all rows on the null block (never handed to requests): the
        (rows, blocks) traced."""
        first = len(self.traces)
        for rows in (1 << i for i in range(bucket(max_rows).bit_length())):
            tables = np.full((rows, 1), NULL_BLOCK, np.int64)
            try:
                mx.eval(self._logits(mx.zeros((rows, 1), mx.int32), tables,
                                     np.zeros(rows, np.int64)))
            except RuntimeError as error:
                if rows == 1:
                    raise
                # Better refused now than failing a server's requests once its batch grows.
                raise RuntimeError(
                    f"a decode step of {rows} rows failed at startup ({error}); --max-num-seqs "
                    f"{rows // 2} keeps every batch to the sizes that ran") from error
        return self.traces[first:]

    def _inputs(self, block_tables: np.ndarray, positions: np.ndarray, rows: int) -> DecodeInputs:
        bs = self.kv.block_size
        batch = len(positions)
        pos = np.zeros(rows, np.int64)
        pos[:batch] = positions
        used = self.blocks_bucket(int(pos.max()) // bs + 1)
        tables = np.full((rows, used), NULL_BLOCK, np.int64)
        width = min(used, block_tables.shape[1])
        tables[:batch, :width] = block_tables[:, :width]
        tables[np.arange(used)[None, :] * bs > pos[:, None]] = NULL_BLOCK
        sent = mx.array(tables.astype(np.int32))
        if used < self.min_read_blocks:  # the bucket's null blocks written on the device
            sent = mx.pad(sent, [(0, 0), (0, self.min_read_blocks - used)],
                          constant_values=NULL_BLOCK)
        return DecodeInputs(offsets=mx.array(pos.astype(np.int32)), tables=sent)

    def _plan(self, offsets: mx.array, tables: mx.array) -> "StepPlan":
        """The step's pool rows and masks, from what the host sent."""
        kv, bs = self.kv, self.kv.block_size
        write_block = mx.take_along_axis(tables, (offsets // bs)[:, None], axis=1)
        write_rows = pool_rows(write_block, kv.num_kv_heads, bs, kv.entries,
                               within=(offsets % bs)[:, None])
        read_rows = position_rows(pool_rows(tables, kv.num_kv_heads, bs, kv.entries), bs)
        masks = self._masks(offsets, tables.shape[-1] * bs)
        return StepPlan(offsets, write_rows, read_rows, dict(zip(self.windows, masks)),
                        self.use_kernel, self.writes_in_place)

    def _masks(self, offsets: mx.array, num_keys: int) -> list[mx.array]:
        """One per window, the keys each row may see. Unused where a kernel attends:
        the trace then drops them."""
        return [allowed_keys(offsets[:, None], num_keys, window, self.grouped_mask)
                for window in self.windows]

    def _forward(self, tokens, offsets, tables, pools):
        self.traces.append((tokens.shape[0], tables.shape[-1]))  # runs only when traced
        pools = list(pools)
        plan = self._plan(offsets, tables)
        hidden = self.model.hidden_states(tokens, [self.kv.layer_cache(pools, i, plan)
                                                   for i in range(len(pools))])
        logits = self.model.logits(hidden[:, -1])
        # Pools written in place stay the arrays they were: nothing new to hand back.
        return (logits,) if self.writes_in_place else (logits, pools)


@dataclass
class StepPlan:
    """``BatchPlan``'s part that ``LayerCache`` reads, inside the traced decode step."""

    offsets: mx.array
    write_rows: mx.array
    read_rows: mx.array
    masks: dict
    use_kernel: bool = False
    write_in_place: bool = False

    def window_of(self, mask) -> tuple[bool, int | None]:
        return window_of(mask, self.masks)

    def layer_mask(self, window_size: int | None, return_array: bool) -> mx.array:
        # A window mlx-lm asks for on its own (Gemma 3) is overridden per layer
        # (OwnWindowLayer), which asks for the windows this step was given.
        return self.masks.get(window_size, self.masks[None])
