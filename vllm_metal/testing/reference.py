"""Independent references for parity tests: Hugging Face transformers in float32."""

import torch


def load_hf(model_dir: str, **kwargs):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager", **kwargs
    )
    return model.eval()


@torch.no_grad()
def greedy_tokens(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt_ids])
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    return out[0, len(prompt_ids):].tolist()


@torch.no_grad()
def logprobs(model, token_ids: list[int]) -> torch.Tensor:
    """float32 log-softmax of the reference logits at every position: [len, vocab]."""
    logits = model(torch.tensor([token_ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)
