"""Decode steps run as compiled MLX graphs unless --enforce-eager: the same tokens
either way, through padded batch buckets, per-layer windows, Gemma 2's grouped
mask and requests that join and leave at different steps; and the step does
not copy the KV pools (its cost does not grow with the cache)."""

import re

import pytest
from conftest import engine_greedy_tokens, start_llm, stop_llm
from vllm import SamplingParams
from vllm.inputs import TokensPrompt


def prompts():
    # 7 requests: decode batches of 7, 6, ... rows pad to buckets of 8, 4, 2, 1
    return [TokensPrompt(prompt_token_ids=[(11 * j + 5 * i) % 480 + 3 for j in range(4 + 9 * i)])
            for i in range(7)]


def generate(model: str, enforce_eager: bool) -> list[list[int]]:
    return engine_greedy_tokens(model, prompts(), [10 + 4 * i for i in range(7)],
                                enforce_eager=enforce_eager, max_num_batched_tokens=64)


@pytest.mark.parametrize("arch, overrides", [
    ("qwen3", {}),
    ("gemma2", {"sliding_window": 8}),  # grouped-query mask, every other layer windowed
])
def test_compiled_decode_equals_eager(arch, overrides, tiny_model):
    model = tiny_model(arch, **overrides)
    compiled, eager = generate(model, False), generate(model, True)
    assert [len(t) for t in compiled] == [10 + 4 * i for i in range(7)]
    assert compiled == eager


def step_issue_ms(log: str) -> float:
    times = [float(m) for m in re.findall(r"step \(async\): 1 reqs, 1 tokens, 1 forward \|.*?forward issue "
                                          r"([0-9.]+) ms", log)]
    assert len(times) >= 20, log[-2000:]
    times.sort()
    return times[len(times) // 2]


def test_decode_step_cost_does_not_grow_with_the_cache(tiny_model, capfd, monkeypatch):
    """A pool still referenced by an in-flight graph would be copied whole each step."""
    monkeypatch.setenv("VLLM_METAL_DEBUG", "1")
    model = tiny_model("qwen3")
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    medians = []
    for kv_bytes in (64 << 20, 2 << 30):
        llm = start_llm(model, kv_cache_memory_bytes=kv_bytes)
        try:
            capfd.readouterr()
            llm.generate([prompts()[2]], params)
        finally:
            stop_llm(llm)
        captured = capfd.readouterr()
        medians.append(step_issue_ms(captured.out + captured.err))
    small, large = medians
    # Copying 2 GB of pools takes hundreds of milliseconds here.
    assert large < max(3 * small, small + 20), medians


def test_each_decode_shape_is_traced_once(tiny_model, capfd):
    """The engine traces each rows bucket at startup, then, as requests join and leave
    (decode batches of 7 down to 1 rows, contexts of 4 to 90 tokens), one graph per
    new bucket of rows and blocks read, never the same bucket twice: a retrace per
    step would cost a trace's time every step."""
    model = tiny_model("qwen3")
    capfd.readouterr()
    generate(model, False)
    captured = capfd.readouterr()
    log = captured.out + captured.err
    warmed = re.search(r"Decode steps traced and run for ([\d, ]+) rows \((\d+) blocks read\)", log)
    assert warmed, log[-3000:]
    warmed_rows = [int(rows) for rows in warmed[1].split(", ")]
    # Every bucket up to max_num_seqs, whatever vLLM's default for it here.
    assert warmed_rows == [1 << i for i in range(len(warmed_rows))] and warmed_rows[-1] >= 8
    startup = {(rows, int(warmed[2])) for rows in warmed_rows}
    traced = [(int(rows), int(blocks)) for rows, blocks in re.findall(
        r"Decode step traced for (\d+) rows, (\d+) blocks read", log)]
    assert traced and len(traced) == len(set(traced)), traced
    assert not startup & set(traced), traced
    assert {rows for rows, _ in traced} <= {1, 2, 4, 8}, traced
    assert all(blocks & (blocks - 1) == 0 for _, blocks in traced), traced


def small_graphs(model, use_kernel: bool = False):
    """Decode graphs over a 4-block cache of 16-token blocks, 2 KV heads of size 8."""
    import mlx.core as mx

    from vllm_metal.attention.decode_graph import DecodeGraphs
    from vllm_metal.attention.paged import PagedKVCache

    kv = PagedKVCache(num_layers=1, num_blocks=4, block_size=16, num_kv_heads=2, head_dim=8,
                      dtype=mx.float32)
    return DecodeGraphs(model, kv, [None], grouped_mask=False, use_kernel=use_kernel)


@pytest.mark.parametrize("use_kernel, expected", [
    # MLX's attention reads every position it is given: the bucket follows the context,
    # at most a quarter past it.
    (False, {1: 1, 17: 2, 100: 8, 145: 10, 1200: 80, 2048: 128, 2049: 160}),
    # A kernel reads up to each position: contexts up to 2048 share 128 blocks of 16.
    (True, {1: 128, 17: 128, 100: 128, 2048: 128, 2049: 256}),
])
def test_blocks_read_bucket(use_kernel, expected):
    import mlx.core as mx
    import numpy as np

    graphs = small_graphs(None, use_kernel)
    tables = np.ones((2, 300), np.int64)
    for context, blocks in expected.items():
        inputs = graphs._inputs(tables, np.array([context - 1, 0]), rows=2)
        assert inputs.tables.shape == (2, blocks), (context, inputs.tables.shape)
        assert inputs.tables.dtype == mx.int32  # what the host sends: 4 bytes a block and row


class FailsAboveRows:
    """A model whose step fails above some rows, as MLX 0.32.4's CUDA build fails an
    8B model's launch at 16 rows in mlx-lm's own loop."""

    def __init__(self, max_rows: int):
        self.max_rows = max_rows

    def hidden_states(self, tokens, caches):
        if tokens.shape[0] > self.max_rows:
            raise RuntimeError("invalid argument")
        return tokens[..., None] * 2.0

    def logits(self, hidden):
        return hidden


def test_warm_up_traces_each_rows_bucket_and_refuses_a_batch_that_fails():
    graphs = small_graphs(FailsAboveRows(4))
    assert graphs.warm_up(3) == [(1, 1), (2, 1), (4, 1)]
    with pytest.raises(RuntimeError, match=r"a decode step of 8 rows failed at startup "
                                           r"\(invalid argument\); --max-num-seqs 4 keeps"):
        graphs.warm_up(256)


@pytest.mark.parametrize("window", [None, 5])
def test_step_addresses_derived_on_the_device_match_the_eager_plan(window):
    """The host sends positions and block tables; the pool rows each row writes and
    reads, and the keys its mask lets it see, are those the eager ``BatchPlan`` gives."""
    import mlx.core as mx
    import numpy as np

    from vllm_metal.attention.paged import BatchPlan

    graphs = small_graphs(None)
    graphs.windows = [None] if window is None else [None, window]
    tables = np.array([[3, 1, 2], [2, 0, 0], [1, 3, 0]])
    positions = np.array([37, 4, 16])  # the last writes a new block's first row
    inputs = graphs._inputs(tables, positions, rows=4)
    plan = graphs._plan(inputs.offsets, inputs.tables)
    eager = BatchPlan.build(tables, positions, [1, 1, 1], 16, 2)
    B, S = 3, int(positions.max()) + 1
    got_writes = np.array(plan.write_rows).reshape(2, 4, 2)[:, :B]  # keys/values, rows, heads
    assert np.array_equal(got_writes, np.array(eager.write_rows).reshape(2, B, 2))
    # The pool's layout, written out: per block, 2 heads of keys then 2 of values, 16 rows each.
    # Row 0 writes position 37: block tables[0][2] = 2, row 5 in it.
    assert got_writes[:, 0].tolist() == [[(2 * 4 + 0) * 16 + 5, (2 * 4 + 1) * 16 + 5],
                                         [(2 * 4 + 2) * 16 + 5, (2 * 4 + 3) * 16 + 5]]
    got_reads = np.array(plan.read_rows).reshape(2, 4, 2, -1)[:, :B, :, :S]
    want_reads = np.array(eager.read_rows).reshape(2, B, 2, S)
    for row, position in enumerate(positions):
        seen = slice(0, position + 1)
        assert np.array_equal(got_reads[:, row, :, seen], want_reads[:, row, :, seen]), row
    for mask_window, mask in plan.masks.items():
        allowed = np.array(mask).reshape(4, -1)[:B]
        for row, position in enumerate(positions):
            first = 0 if mask_window is None else position - mask_window + 1
            want = [first <= key <= position for key in range(allowed.shape[1])]
            assert allowed[row].tolist() == want, (mask_window, row)
    assert plan.offsets.dtype == mx.int32
