"""The requests a runner holds between steps, in vLLM's persistent ``InputBatch``.

Each step the scheduler's output is folded in (``update``): finished requests
leave, new ones join, cached ones get their new blocks and computed counts; an
earlier pipeline stage, which samples nothing, learns the tokens the last stage
sampled from the scheduler. Sampled tokens are booked back (``append_sampled``).
Rows are vLLM's: the same order every rank of a stage checks (``fingerprint``).
"""

import hashlib

import numpy as np
import torch
from vllm.sampling_params import SamplingType
from vllm.v1.worker.gpu_input_batch import CachedRequestState, InputBatch

from vllm_metal.prompt_logprobs import PromptLogprobs
from vllm_metal.sampling import plain_greedy

CPU = torch.device("cpu")


class PersistentBatch:
    def __init__(self, prompt_logprobs: PromptLogprobs, is_last_stage: bool):
        self.requests: dict[str, CachedRequestState] = {}
        self.prompt_logprobs = prompt_logprobs
        self.is_last_stage = is_last_stage
        self.input_batch: InputBatch | None = None  # once the KV cache is sized

    def update(self, scheduler_output) -> None:
        batch = self.input_batch
        for req_id in scheduler_output.finished_req_ids:
            self.requests.pop(req_id, None)
            self.prompt_logprobs.drop(req_id)
            batch.remove_request(req_id)

        scheduled = scheduler_output.num_scheduled_tokens.keys()
        cached = scheduler_output.scheduled_cached_reqs
        for req_id in batch.req_id_to_index.keys() - (scheduled - cached.resumed_req_ids):
            batch.remove_request(req_id)

        to_add = [self._new_request(data) for data in scheduler_output.scheduled_new_reqs]

        for i, req_id in enumerate(cached.req_ids):
            state = self.requests[req_id]
            state.num_computed_tokens = cached.num_computed_tokens[i]
            new_blocks = cached.new_block_ids[i]
            num_output = cached.num_output_tokens[i]
            if num_output < len(state.output_token_ids):
                del state.output_token_ids[num_output:]
            if not self.is_last_stage and cached.new_token_ids:
                self._learn_sampled_tokens(state, cached.new_token_ids[i],
                                           cached.all_token_ids.get(req_id))
            if req_id in cached.resumed_req_ids:
                state.block_ids = new_blocks
                to_add.append(state)
                continue
            if new_blocks is not None:
                for ids, new_ids in zip(state.block_ids, new_blocks):
                    ids.extend(new_ids)
            index = batch.req_id_to_index.get(req_id)
            if index is None:
                to_add.append(state)
                continue
            batch.num_computed_tokens_cpu[index] = state.num_computed_tokens
            if new_blocks is not None:
                batch.block_table.append_row(new_blocks, index)
            if not self.is_last_stage and cached.new_token_ids:
                self._write_known_tokens(index, state)
            batch.update_req_spec_token_ids(state, scheduler_output.scheduled_spec_decode_tokens)

        for state in to_add:
            batch.add_request(state)
            batch.update_req_spec_token_ids(state, scheduler_output.scheduled_spec_decode_tokens)
        batch.condense()
        batch.refresh_metadata()

    def _learn_sampled_tokens(self, state: CachedRequestState, token_ids: list[int],
                              all_token_ids: list[int] | None) -> None:
        """An earlier pipeline stage does not sample: the scheduler sends the tokens
        it is about to compute, the last of which the last stage sampled (all of a
        request's tokens when it was not scheduled just before). Drafts the last
        stage accepted sit in the batch already, as last step's spec tokens."""
        num_prompt = len(state.prompt_token_ids)
        output = state.output_token_ids
        if all_token_ids is not None:
            output[:] = all_token_ids[num_prompt:]
            return
        first_output = state.num_computed_tokens - num_prompt
        row = self.input_batch.req_id_to_index.get(state.req_id)
        if row is not None and len(output) < first_output:
            accepted = self.input_batch.token_ids_cpu[row, num_prompt + len(output):
                                                      num_prompt + first_output]
            output.extend(int(t) for t in accepted)
        for i, token in enumerate(token_ids):
            j = first_output + i
            if j == len(output):
                output.append(token)
            elif 0 <= j < len(output):
                output[j] = token

    def _write_known_tokens(self, row: int, state: CachedRequestState) -> None:
        batch = self.input_batch
        num_prompt = len(state.prompt_token_ids)
        end = num_prompt + len(state.output_token_ids)
        start = min(int(batch.num_tokens_no_spec[row]), end)
        if start < num_prompt:
            start = num_prompt
        batch.token_ids_cpu[row, start:end] = state.output_token_ids[start - num_prompt:]
        batch.is_token_ids[row, start:end] = True
        batch.num_tokens_no_spec[row] = max(int(batch.num_tokens_no_spec[row]), end)

    def _new_request(self, data) -> CachedRequestState:
        params = data.sampling_params
        generator = None
        if params is not None and params.sampling_type == SamplingType.RANDOM_SEED:
            generator = torch.Generator(device=CPU)
            generator.manual_seed(params.seed)
        state = CachedRequestState(
            req_id=data.req_id,
            prompt_token_ids=data.prompt_token_ids,
            mm_features=data.mm_features,
            sampling_params=params,
            generator=generator,
            block_ids=tuple(list(ids) for ids in data.block_ids),
            num_computed_tokens=data.num_computed_tokens,
            output_token_ids=[],
            lora_request=data.lora_request,
        )
        if data.prompt_token_ids is None:
            raise ValueError("vllm-metal needs prompt token ids (prompt embeddings are not supported)")
        self.requests[data.req_id] = state
        self.prompt_logprobs.add(data.req_id, params, self.input_batch.vocab_size)
        return state

    def append_sampled(self, sampled: list[list[int]]) -> None:
        batch = self.input_batch
        for row, ids in enumerate(sampled):
            if not ids:
                continue
            start = int(batch.num_tokens_no_spec[row])
            end = start + len(ids)
            batch.token_ids_cpu[row, start:end] = ids
            batch.is_token_ids[row, start:end] = True
            batch.num_tokens_no_spec[row] = end
            self.requests[batch.req_ids[row]].output_token_ids.extend(ids)

    def rows_still_in_prefill(self, scheduler_output) -> list[int]:
        """Rows whose scheduled tokens end before the prompt (and any recomputed
        output) does: their sampled token is not a real next token."""
        batch = self.input_batch
        rows = []
        for row, req_id in enumerate(batch.req_ids):
            end = batch.num_computed_tokens_cpu[row] + scheduler_output.num_scheduled_tokens[req_id]
            if end < batch.num_tokens_no_spec[row]:
                rows.append(row)
        return rows

    def all_plain_greedy(self) -> bool:
        return all(plain_greedy(self.requests[req_id].sampling_params)
                   for req_id in self.input_batch.req_ids)

    def fingerprint(self, scheduler_output) -> int:
        """The batch composition every rank must agree on: requests in row order, and
        for each its scheduled tokens, position, drafts and blocks."""
        batch = self.input_batch
        digest = hashlib.blake2b(digest_size=8)
        for row, req_id in enumerate(batch.req_ids):
            digest.update(req_id.encode())
            digest.update(np.array([
                scheduler_output.num_scheduled_tokens[req_id],
                batch.num_computed_tokens_cpu[row],
                batch.num_tokens_no_spec[row],
                len(batch.spec_token_ids[row]),
            ], np.int64).tobytes())
            digest.update(batch.block_table[0].get_numpy_array()[row, :4].tobytes())
        return int.from_bytes(digest.digest(), "little")
