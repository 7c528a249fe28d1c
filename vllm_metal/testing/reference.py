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
def logits(model, token_ids: list[int]) -> torch.Tensor:
    """float32 reference logits at every position: [len, vocab]."""
    return model(torch.tensor([token_ids])).logits[0].float()


def logprobs(model, token_ids: list[int]) -> torch.Tensor:
    """float32 log-softmax of the reference logits at every position: [len, vocab]."""
    return torch.log_softmax(logits(model, token_ids), dim=-1)


def mlx_lm_greedy(model_dir: str, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """mlx-lm's loading and KV cache on the same files, one token at a time, with the
    model definition the plugin runs (mlx-lm's, or its correction: models/registry.py)."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.utils import load_model

    from pathlib import Path

    from vllm_metal.models.loader import _classes_by_architecture

    model, _ = load_model(Path(model_dir), get_model_classes=_classes_by_architecture)
    cache = make_prompt_cache(model)
    tokens, out = mx.array([prompt_ids]), []
    for _ in range(max_new_tokens):
        next_token = int(mx.argmax(model(tokens, cache=cache)[0, -1]))
        out.append(next_token)
        tokens = mx.array([[next_token]])
    return out



def with_peft_adapter(model, adapter_dir):
    """``model`` (a transformers model) running a PEFT LoRA adapter through PEFT
    itself: the reference for an adapter's tokens."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(adapter_dir)).eval()
