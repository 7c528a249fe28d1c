"""--logits-processors: vLLM's logits-processor interface, run by the runner's sampler."""

import torch
from conftest import start_llm, stop_llm
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import LogitsProcessor

FORCED_TOKEN = 42


class ForceOneToken(LogitsProcessor):
    """Every row of every step samples FORCED_TOKEN."""

    def __init__(self, vllm_config, device, is_pin_memory):
        pass

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update) -> None:
        pass

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        forced = torch.full_like(logits, float("-inf"))
        forced[:, FORCED_TOKEN] = 0.0
        return forced


def test_custom_logits_processor_decides_every_token(tiny_model):
    llm = start_llm(tiny_model("qwen3"), logits_processors=[ForceOneToken])
    try:
        greedy = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
        sampled = SamplingParams(max_tokens=6, temperature=1.0, seed=3, ignore_eos=True)
        outputs = llm.generate(["The river", "Anna sees a small cat"], [greedy, sampled])
    finally:
        stop_llm(llm)
    for output in outputs:
        assert output.outputs[0].token_ids == [FORCED_TOKEN] * 6
