"""The paged KV cache on its own: steps read back what earlier steps (and their
own tokens) wrote, whatever the batch's padding; the pools hold exactly the
bytes the memory accounting counts; and a layer's reads and writes stay a
handful of MLX primitives (each costs the host time when a step is issued)."""

import collections
import re

import mlx.core as mx
import numpy as np
import pytest

from vllm_metal.attention.paged import BatchPlan, PagedKVCache

BLOCK, HEAD_DIM, NUM_BLOCKS = 4, 8, 64


@pytest.mark.parametrize("kv_heads", [1, 3])
def test_steps_read_back_what_was_written(kv_heads):
    rng = np.random.default_rng(kv_heads)
    for batch in (1, 2, 4):
        cache = PagedKVCache(2, NUM_BLOCKS, BLOCK, kv_heads, HEAD_DIM, mx.float32)
        tables = 1 + rng.permutation(NUM_BLOCKS - 1)[: batch * 12].reshape(batch, 12)
        written = [[] for _ in range(batch)]  # per request: [H, D] per position
        start = np.zeros(batch, np.int64)
        for query_max in (9, 3, 1, 1, 6):  # prompt chunks, decodes, a verify-sized step
            qlens = rng.integers(1, query_max + 1, batch)
            L = int(qlens.max())
            plan = BatchPlan.build(tables, start, qlens, BLOCK, kv_heads)
            keys = mx.array(rng.standard_normal((batch, kv_heads, L, HEAD_DIM)), mx.float32)
            values = mx.array(rng.standard_normal((batch, kv_heads, L, HEAD_DIM)), mx.float32)
            for b in range(batch):
                written[b] += [(np.array(keys[b, :, t]), np.array(values[b, :, t]))
                               for t in range(int(qlens[b]))]
            for view in cache.layer_views(plan):
                got_keys, got_values = view.update_and_fetch(keys, values)
                assert got_keys.shape == (batch, kv_heads, int((start + qlens).max()), HEAD_DIM)
                for b in range(batch):
                    want_k = np.stack([k for k, _ in written[b]], axis=1)
                    want_v = np.stack([v for _, v in written[b]], axis=1)
                    np.testing.assert_array_equal(np.array(got_keys[b, :, : len(written[b])]),
                                                  want_k)
                    np.testing.assert_array_equal(np.array(got_values[b, :, : len(written[b])]),
                                                  want_v)
            start += qlens


def test_pools_hold_the_bytes_per_block_counted():
    layers, heads = 3, 2
    cache = PagedKVCache(layers, NUM_BLOCKS, BLOCK, heads, HEAD_DIM, mx.bfloat16)
    held = sum(pool.nbytes for pool in cache.pools)
    assert held == NUM_BLOCKS * PagedKVCache.bytes_per_block(layers, BLOCK, heads, HEAD_DIM, 2)


def primitives(*arrays) -> collections.Counter:
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "graph.dot")
        mx.export_to_dot(str(path), *arrays)
        return collections.Counter(re.findall(r'label ="([A-Za-z0-9_]+)', path.read_text()))


@pytest.mark.parametrize("batch, query_len", [(1, 1), (8, 1), (2, 5)])
def test_a_layer_reads_and_writes_in_six_primitives(batch, query_len):
    heads = 2
    cache = PagedKVCache(1, NUM_BLOCKS, BLOCK, heads, HEAD_DIM, mx.float32)
    tables = 1 + np.arange(batch * 4).reshape(batch, 4)
    plan = BatchPlan.build(tables, [3] * batch, [query_len] * batch, BLOCK, heads)
    keys = mx.zeros((batch, heads, query_len, HEAD_DIM))
    values = mx.ones((batch, heads, query_len, HEAD_DIM))
    mx.eval(keys, values, plan.write_rows, plan.read_rows)
    ops = primitives(*cache.layer_views(plan)[0].update_and_fetch(keys, values))
    assert ops == {"Concatenate": 1, "Reshape": 1, "Scatter": 1, "Gather": 1, "Squeeze": 1,
                   "Split": 1}
