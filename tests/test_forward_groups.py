"""Prompt chunks of like length run as one padded forward, within the padding and
score bounds; a chunk that reads blocks another writes in the same step runs after
it; and the engine gives the reference's tokens when it pads prompts together."""

import contextlib
import logging
import random
import re

import numpy as np
import pytest
from conftest import start_llm, stop_llm
from vllm import SamplingParams
from vllm.inputs import TokensPrompt

from vllm_metal.forward_groups import PADDING, SCORES_BUDGET, plan_groups
from vllm_metal.testing.reference import greedy_tokens, load_hf

BS = 16


def tables_for(chunks, width=64, first_block=1):
    """Distinct blocks for each row of ``chunks`` ((row, query len, start))."""
    tables = np.zeros((max(row for row, _, _ in chunks) + 1, width), np.int64)
    next_block = first_block
    for row, query_len, start in chunks:
        used = -(-(start + query_len) // BS)
        tables[row, :used] = np.arange(next_block, next_block + used)
        next_block += used
    return tables


def chunk_plan(chunks, tables=None):
    tables = tables_for(chunks) if tables is None else tables
    return plan_groups([(row, n, start, False) for row, n, start in chunks], tables, BS)


def test_prompts_of_one_length_run_as_one_forward_and_decodes_as_another():
    chunks = [(row, 32, 0) for row in range(32)]
    scheduled = [(32, 1, 40, True), (33, 1, 7, True)] + [(r, n, s, False) for r, n, s in chunks]
    groups = plan_groups(scheduled, tables_for(chunks + [(32, 1, 40), (33, 1, 7)]), BS)
    assert [g.rows for g in groups] == [[32, 33], list(range(32))]


def test_a_short_prompt_does_not_pad_to_a_long_one():
    groups = chunk_plan([(0, 240, 0), (1, 1, 0), (2, 9, 0), (3, 30, 0)])
    assert sorted(g.rows for g in groups) == [[0], [1], [2], [3]]


def test_random_steps_keep_each_groups_padding_and_scores_in_bounds():
    rng = random.Random(0)
    for _ in range(300):
        chunks = [(row, rng.choice([rng.randrange(1, 40), rng.randrange(1, 600)]),
                   rng.choice([0, 0, BS * rng.randrange(0, 20)])) for row in range(rng.randrange(1, 40))]
        groups = chunk_plan(chunks)
        assert sorted(r for g in groups for r in g.rows) == [c[0] for c in chunks]
        for g in groups:
            if len(g.rows) == 1:
                continue
            lens, ends = g.query_lens, [s + n for s, n in zip(g.starts, g.query_lens)]
            assert len(lens) * max(lens) <= PADDING * sum(lens)
            scores = len(lens) * max(lens) * max(ends)
            assert scores <= PADDING * sum(n * e for n, e in zip(lens, ends))
            assert scores <= SCORES_BUDGET


def test_a_chunk_reading_blocks_written_this_step_runs_after_their_writer():
    # Row 0 computes a 40-token prompt in blocks 1-3; rows 1 and 2 share its first two
    # blocks (cached when it was scheduled) and compute longer suffixes; row 3 reads
    # row 2's new block.
    tables = np.zeros((4, 8), np.int64)
    tables[0, :3] = [1, 2, 3]
    tables[1, :5] = [1, 2, 4, 5, 6]
    tables[2, :4] = [1, 2, 7, 8]
    tables[3, :4] = [1, 2, 7, 9]
    chunks = [(0, 40, 0), (1, 60, 32), (2, 30, 32), (3, 10, 48)]
    groups = chunk_plan(chunks, tables)
    position = {row: i for i, g in enumerate(groups) for row in g.rows}
    assert position[1] > position[0] and position[2] > position[0]
    assert position[3] > position[2]


GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
# Like lengths that pad together (40 and 32: the 32-token prompt's padded queries
# reach past a window of 8 beyond its context).
LENGTHS = [40, 32, 37, 35, 22, 20, 19, 18, 1, 2]


@pytest.fixture
def in_process_engine(monkeypatch):
    """An engine in this process schedules all of a generate call's requests in its
    first step; VLLM_METAL_DEBUG logs each step's line."""
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    monkeypatch.setenv("VLLM_METAL_DEBUG", "1")


@contextlib.contextmanager
def step_lines():
    """The runner's log lines while the block runs (attached after the engine starts:
    vLLM's logging setup at startup drops the loggers' handlers)."""
    lines = []

    class Keep(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    handler, logger = Keep(), logging.getLogger("vllm.metal")
    logger.addHandler(handler)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)


def generate_with_step_lines(model: str, prompts: list[list[int]], params):
    """An engine started for the call: its outputs and its step lines."""
    llm = start_llm(model)
    try:
        with step_lines() as lines:
            outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params)
    finally:
        stop_llm(llm)
    return outputs, "\n".join(lines)


def reference_tokens(model: str, prompts: list[list[int]]) -> list[list[int]]:
    """transformers' float32 greedy tokens for each prompt (GREEDY's count)."""
    hf = load_hf(model)
    return [greedy_tokens(hf, p, GREEDY.max_tokens) for p in prompts]


def busiest_step(log: str) -> tuple[int, int]:
    """(requests, forwards) of the step that ran the most tokens."""
    steps = re.findall(r"step \((?:async|sync)\): (\d+) reqs, (\d+) tokens, (\d+) forwards?", log)
    reqs, _, forwards = max(steps, key=lambda s: int(s[1]))
    return int(reqs), int(forwards)


@pytest.mark.parametrize("arch, overrides", [
    ("qwen3", {}),
    ("gemma2", {"sliding_window": 8}),  # grouped-query mask, every other layer windowed
    ("gpt_oss", {}),  # attention sinks, a window of 8 every other layer
    ("deepseek_v3", {}),  # latent attention
    ("mixtral", {}),
])
def test_prompts_padded_together_give_the_reference_tokens(arch, overrides, tiny_model,
                                                           in_process_engine):
    model = tiny_model(arch, **overrides)
    rng = random.Random(3)
    prompts = [[rng.randrange(3, 500) for _ in range(n)] for n in LENGTHS]
    outputs, log = generate_with_step_lines(model, prompts, GREEDY)
    reqs, forwards = busiest_step(log)
    assert reqs == len(LENGTHS) and forwards <= 5, forwards  # alone: a forward a prompt
    assert [list(o.outputs[0].token_ids) for o in outputs] == reference_tokens(model, prompts)


def test_one_padded_group_gives_each_prompt_its_own_tokens(tiny_model, in_process_engine):
    """A step of one group whose rows run longest first, not in the batch's order."""
    model = tiny_model("qwen3")
    rng = random.Random(5)
    prompts = [[rng.randrange(3, 500) for _ in range(n)] for n in (30, 32)]
    outputs, log = generate_with_step_lines(model, prompts, GREEDY)
    assert busiest_step(log) == (2, 1)
    assert [list(o.outputs[0].token_ids) for o in outputs] == reference_tokens(model, prompts)


def test_prompts_sharing_blocks_in_their_first_step_give_the_reference_tokens(
        tiny_model, in_process_engine):
    """vLLM caches a prompt's blocks as it schedules them: prompts with a common prefix
    scheduled in one step read keys that the first computes in that same step, and the 4
    samples of each prompt (top-k 1: the greedy tokens) read their first sample's."""
    model = tiny_model("qwen3")
    rng = random.Random(4)
    prefix = [rng.randrange(3, 500) for _ in range(32)]
    # The second's new tokens outnumber all of the first's, whose blocks it reads:
    # padded groups run the longest first.
    prompts = [prefix + [rng.randrange(3, 500) for _ in range(n)] for n in (3, 60, 12)]
    params = SamplingParams(n=4, max_tokens=GREEDY.max_tokens, temperature=1.0, top_k=1,
                            ignore_eos=True)
    outputs, log = generate_with_step_lines(model, prompts, params)
    reqs, tokens = map(int, re.search(r"step \((?:async|sync)\): (\d+) reqs, (\d+) tokens",
                                      log).groups())
    assert reqs == 12 and tokens <= 4 * sum(map(len, prompts)) - 11 * 32, (reqs, tokens)
    for expected, output in zip(reference_tokens(model, prompts), outputs):
        assert [list(c.token_ids) for c in output.outputs] == [expected] * 4
