"""The two calls the runner makes on an mlx-lm model: hidden states for a padded
batch, and logits for the rows that need them (so the vocabulary projection runs
only on sampled positions)."""

import mlx.core as mx
import mlx.nn as nn


class CausalLM:
    def __init__(self, model: nn.Module):
        self.model = model
        self.backbone = model.model
        self.lm_head = model.lm_head if "lm_head" in model else None
        args = getattr(model, "args", None)
        self.final_softcap = getattr(model, "final_logit_softcapping", None) or getattr(
            args, "final_logit_softcapping", None
        )

    def modules(self):
        """No torch modules: vLLM's in-process engine walks ``model_runner.model.modules()``
        at exit to release torch.compile wrappers."""
        return iter(())

    @property
    def num_layers(self) -> int:
        return len(self.model.layers)

    def hidden_states(self, tokens: mx.array, caches: list) -> mx.array:
        """``tokens`` [B, L] -> final-norm hidden states [B, L, D]."""
        return self.backbone(tokens, caches)

    def logits(self, hidden: mx.array) -> mx.array:
        if self.lm_head is not None:
            out = self.lm_head(hidden)
        else:
            out = self.backbone.embed_tokens.as_linear(hidden)
        if self.final_softcap:
            out = mx.tanh(out / self.final_softcap) * self.final_softcap
        return out
