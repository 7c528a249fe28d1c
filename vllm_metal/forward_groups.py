"""Which of a step's scheduled requests run together as one padded forward.

Every single-token decode (with any draft tokens to verify) joins one group, the
compiled decode step's. Prompt chunks join a right-padded ``[B, L]`` group with
chunks of like length: the host issues a forward's primitives once whatever B is,
so 32 prompts arriving together cost one forward, not 32 (on a GPU a small model's
forward is set by that issue, not by its arithmetic). A chunk joins a group only
while the group's padding stays within ``PADDING`` of its real work, in tokens and
in attention scores, and its scores within ``SCORES_BUDGET``: a padded group holds
all its requests' scores at once where separate forwards held one request's at a
time. A chunk that reads blocks another chunk writes in the same step runs in a later
group than that chunk (``waves``).
"""

from dataclasses import dataclass

import numpy as np

from vllm_metal.attention.paged import NULL_BLOCK

# A group's padded tokens (B x L) and scores (B x L x S) at most this times its own.
PADDING = 1.25
# Query-key pairs a group of more than one chunk may hold: 2 M, 256 MiB of float32
# scores at 32 heads (a single chunk is never split: its scores are vLLM's token
# budget's to bound).
SCORES_BUDGET = 1 << 21


@dataclass
class ForwardGroup:
    """Rows of the input batch that run as one padded [B, L] forward."""

    rows: list[int]
    query_lens: list[int]
    starts: list[int]  # tokens each row has in the cache before this step

    def padded(self, query_len: int, start: int) -> tuple[int, int, int, int]:
        """With a chunk of ``query_len`` tokens from ``start`` added: the group's
        padded tokens and scores, then its own."""
        lens = self.query_lens + [query_len]
        ends = [s + n for s, n in zip(self.starts + [start], lens)]
        rows, longest, widest = len(lens), max(lens), max(ends)
        return (rows * longest, rows * longest * widest, sum(lens),
                sum(n * end for n, end in zip(lens, ends)))

    def add(self, row: int, query_len: int, start: int) -> None:
        self.rows.append(row)
        self.query_lens.append(query_len)
        self.starts.append(start)


def plan_groups(scheduled: list[tuple[int, int, int, bool]], block_tables: np.ndarray,
                block_size: int, pad_together: bool = True) -> list[ForwardGroup]:
    """``scheduled``: (row, tokens scheduled, tokens cached, a plain decode) of each
    request; ``block_tables``: the input batch's, by row -> the decode group first
    (if any), then the prompt chunks' groups in an order they may run in (each
    chunk alone unless ``pad_together``)."""
    decode = ForwardGroup([], [], [])
    chunks = []
    for row, query_len, start, is_decode in scheduled:
        if is_decode:
            decode.add(row, query_len, start)
        else:
            chunks.append((row, query_len, start))
    groups = [decode] if decode.rows else []
    for wave in waves(chunks, block_tables, block_size):
        groups += chunk_groups(wave) if pad_together else [
            ForwardGroup([row], [query_len], [start]) for row, query_len, start in wave]
    return groups


def waves(chunks: list[tuple[int, int, int]], block_tables: np.ndarray,
          block_size: int) -> list[list[tuple[int, int, int]]]:
    """Prompt chunks in waves, each after the waves whose chunks write blocks it reads.
    vLLM caches a prompt's blocks when it schedules them, so a request scheduled
    after another with the same prefix, in the same step, is handed blocks whose keys
    that other request computes in this step (``SamplingParams(n=4)`` does so)."""
    writer = {}
    for row, query_len, start in chunks:
        first, last = start // block_size, (start + query_len - 1) // block_size
        for block in map(int, block_tables[row, first:last + 1]):
            if block != NULL_BLOCK:
                writer[block] = row
    read_from = {row: {writer[b] for b in map(int, block_tables[row, :-(-start // block_size)])
                       if writer.get(b, row) != row}
                 for row, _, start in chunks}
    wave_of: dict[int, int] = {}

    def wave(row: int) -> int:
        if row not in wave_of:
            wave_of[row] = 1 + max((wave(w) for w in read_from[row]), default=-1)
        return wave_of[row]

    ordered = [[] for _ in range(1 + max((wave(c[0]) for c in chunks), default=-1))]
    for chunk in chunks:
        ordered[wave(chunk[0])].append(chunk)
    return ordered


def chunk_groups(chunks: list[tuple[int, int, int]]) -> list[ForwardGroup]:
    """(row, query length, start) of each prompt chunk -> padded groups, each
    chunk in the group of the longest chunks it fits beside."""
    groups: list[ForwardGroup] = []
    for row, query_len, start in sorted(chunks, key=lambda c: (c[1], c[1] + c[2]),
                                        reverse=True):
        if groups and _fits(groups[-1], query_len, start):
            groups[-1].add(row, query_len, start)
        else:
            groups.append(ForwardGroup([row], [query_len], [start]))
    return groups


def _fits(group: ForwardGroup, query_len: int, start: int) -> bool:
    tokens, scores, own_tokens, own_scores = group.padded(query_len, start)
    return (tokens <= PADDING * own_tokens and scores <= PADDING * own_scores
            and scores <= SCORES_BUDGET)
