"""Speculative decoding with n-gram drafts: vLLM's ``NgramProposer`` proposes
them on the sampling rank, the next step verifies them in its forward (logits at
each draft position: ``StepState.draft_checks``), and greedy requests keep the
drafts the model agrees with."""

from vllm.v1.outputs import DraftTokenIds

from vllm_metal.sampling import plain_greedy


class NgramDrafts:
    def __init__(self, vllm_config, proposes: bool):
        spec = vllm_config.speculative_config
        self.num_spec_tokens = spec.num_speculative_tokens if spec is not None else 0
        self.drafter = None
        if spec is not None and proposes:
            from vllm.v1.spec_decode.ngram_proposer import NgramProposer

            self.drafter = NgramProposer(vllm_config)
        self.proposed: DraftTokenIds | None = None

    def accept(self, sampled: list[list[int]], draft_checks: dict, batch, requests: dict) -> None:
        """Greedy verification: keep drafts while each equals the model's argmax,
        then the argmax after the last kept one. Other requests keep the one token
        sampled at the first position, which is exact sampling with every draft rejected."""
        for row, check in draft_checks.items():
            params = requests[batch.req_ids[row]].sampling_params
            if not sampled[row] or not plain_greedy(params):
                continue
            drafts, argmaxes = batch.spec_token_ids[row], check.tolist()
            kept = 0
            while kept < len(drafts) and drafts[kept] == argmaxes[kept]:
                kept += 1
            sampled[row] = argmaxes[: kept + 1]

    def propose(self, sampled: list[list[int]], scheduler_output, batch) -> None:
        if self.drafter is None:
            return
        drafts = self.drafter.propose(
            scheduler_output.num_spec_tokens_to_schedule or self.num_spec_tokens,
            sampled, batch.num_tokens_no_spec, batch.token_ids_cpu,
        )
        self.proposed = DraftTokenIds(list(batch.req_ids), drafts)

    def take(self) -> DraftTokenIds | None:
        drafts, self.proposed = self.proposed, None
        return drafts
