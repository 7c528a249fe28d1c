"""Prompt logprobs: the log-probabilities of each prompt token given the ones
before it, gathered chunk by chunk as a prompt's prefill runs.

A request that asks for them runs its prompt chunks with logits at every
position (``wants``: never in a padded group's decode graph), and leaves this
path once its prompt is done, on every rank alike: it decides how requests are
grouped into forwards.
"""

import mlx.core as mx
import numpy as np
import torch
from vllm.v1.outputs import LogprobsTensors


class PromptLogprobs:
    def __init__(self):
        self.top_k: dict[str, int] = {}  # req_id -> logprobs wanted beside the prompt token's

    def add(self, req_id: str, params, vocab_size: int) -> None:
        if params is not None and params.prompt_logprobs is not None:
            self.top_k[req_id] = vocab_size if params.prompt_logprobs == -1 else params.prompt_logprobs

    def drop(self, req_id: str) -> None:
        self.top_k.pop(req_id, None)

    def wants(self, req_id: str) -> bool:
        return req_id in self.top_k

    def collect(self, prompt_logits: dict[str, mx.array], requests: dict, sampler) -> dict:
        """Book this step's chunk of each prompt; returns the tensors of prompts
        whose last chunk this was (vLLM's ``prompt_logprobs_dict``)."""
        result = {}
        for req_id, chunk_logits in prompt_logits.items():
            request = requests[req_id]
            num_prompt = len(request.prompt_token_ids)
            k = self.top_k[req_id]
            if request.in_progress_prompt_logprobs_cpu is None:
                request.in_progress_prompt_logprobs_cpu = LogprobsTensors.empty_cpu(num_prompt - 1, k + 1)
            tensors = request.in_progress_prompt_logprobs_cpu
            start = request.num_computed_tokens
            remaining = num_prompt - (start + 1)
            count = min(chunk_logits.shape[0], remaining)
            if chunk_logits.shape[0] > remaining:
                result[req_id] = tensors
            if count <= 0:
                continue
            logits = torch.from_numpy(np.array(chunk_logits[:count].astype(mx.float32)))
            targets = torch.tensor(request.prompt_token_ids[start + 1 : start + 1 + count])
            token_ids, logprobs, ranks, *_ = sampler.gather_logprobs(
                sampler.compute_logprobs(logits), k, targets
            )
            tensors.logprob_token_ids[start : start + count].copy_(token_ids)
            tensors.logprobs[start : start + count].copy_(logprobs)
            tensors.selected_token_ranks[start : start + count].copy_(ranks)
        return result

    def finish(self, scheduler_output, requests: dict) -> None:
        """Requests whose prompt is done leave the prompt-logprob path."""
        for req_id in list(self.top_k):
            request = requests[req_id]
            scheduled = scheduler_output.num_scheduled_tokens.get(req_id, 0)
            if scheduled and request.num_computed_tokens + scheduled >= len(request.prompt_token_ids):
                del self.top_k[req_id]
                request.in_progress_prompt_logprobs_cpu = None
