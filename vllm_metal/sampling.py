"""Sampling through vLLM's own torch ``Sampler`` (every option with vLLM's
semantics), and what the runner needs around it: when argmax alone is the
answer, grammar masks for logits of one row per request, and sampled tokens
packed for a tensor-parallel broadcast."""

from dataclasses import replace

import numpy as np
import torch
from vllm.sampling_params import SamplingType


def plain_greedy(params) -> bool:
    """Greedy with nothing that changes or reports the logits: argmax is the answer."""
    return (
        params.sampling_type == SamplingType.GREEDY
        and params.logprobs is None
        and params.presence_penalty == 0.0
        and params.frequency_penalty == 0.0
        and params.repetition_penalty == 1.0
        and not params.logit_bias
        and not params.allowed_token_ids
        and not params.bad_words_token_ids
        and params.min_tokens == 0
        and params.structured_outputs is None
    )


def sample_with_vllm(sampler, logits: torch.Tensor, batch, discard: list[int]):
    """vLLM's sampler; a seeded request whose token is discarded (still in
    prefill) gets its generator state back, so chunking does not shift its samples."""
    saved = {row: batch.generators[row].get_state() for row in discard if row in batch.generators}
    output = sampler(logits=logits, sampling_metadata=batch.sampling_metadata)
    for row, rng in saved.items():
        batch.generators[row].set_state(rng)
    return output


def first_position_masks(scheduler_output, grammar_output):
    """The logits hold one row per request (its first sampling position); vLLM's
    bitmask has one per scheduled position, drafts included. A request under a
    grammar is sampled, so it keeps only its first position's token and mask."""
    spec = scheduler_output.scheduled_spec_decode_tokens
    if not spec:
        return scheduler_output, grammar_output
    rows, row = [], 0
    for req_id in grammar_output.structured_output_request_ids:
        rows.append(row)
        row += 1 + len(spec.get(req_id, ()))
    return (replace(scheduler_output, scheduled_spec_decode_tokens={}),
            replace(grammar_output, grammar_bitmask=grammar_output.grammar_bitmask[rows]))


def encode_sampled(sampled: list[list[int]], width: int) -> np.ndarray:
    """[num_reqs, width] of token + 1, 0 where none (the broadcast sums)."""
    table = np.zeros((len(sampled), width), np.int32)
    for row, ids in enumerate(sampled):
        table[row, : len(ids)] = np.asarray(ids, np.int32) + 1
    return table


def decode_sampled(table) -> list[list[int]]:
    return [[int(t) - 1 for t in row if t] for row in table]
