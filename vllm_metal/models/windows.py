"""Sliding-window attention, per layer, as transformers applies it.

transformers lets query position q see key positions k with q - W < k <= q for
a window of W: W keys, the query's own included (``BatchPlan.mask`` does the
same). Which layers slide depends on the architecture:

- Mistral, Phi-3, Mixtral, Qwen3-MoE: every layer, with ``sliding_window``
  (Qwen3-MoE only under ``use_sliding_window``; the config clears the window
  otherwise).
- Qwen2, Qwen3, Gemma 2, Gemma 3, gpt-oss: the layers ``layer_types`` marks
  "sliding_attention" (Qwen: from ``max_window_layers`` on, under
  ``use_sliding_window``; Gemma 2: every other layer, from the first; Gemma 3:
  all but every ``sliding_window_pattern``-th).
- Llama: none.

mlx-lm's models build one mask from one layer's cache and hand it to every layer,
and of these only Gemma 3's (and Llama's, given ``layer_types``) apply a window
at all, so each decoder layer is wrapped to attend with the mask of its own
window.
"""

import mlx.core as mx
import mlx.nn as nn

EVERY_LAYER_WINDOW = {
    "MistralForCausalLM",
    "Phi3ForCausalLM",
    "MixtralForCausalLM",
    "Qwen3MoeForCausalLM",
}
LAYER_TYPES_WINDOW = {
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Gemma2ForCausalLM",
    "Gemma3ForCausalLM",
    "GptOssForCausalLM",
}
MLX_LM_GEMMA3_DEFAULT_PATTERN = 6


def layer_windows(arch: str, hf_config) -> list[int | None]:
    """The window of each layer (None: full causal attention)."""
    num_layers = hf_config.num_hidden_layers
    window = getattr(hf_config, "sliding_window", None)
    if not getattr(hf_config, "use_sliding_window", True):
        window = None
    if window is None:
        return [None] * num_layers
    if arch in EVERY_LAYER_WINDOW:
        return [window] * num_layers
    if arch in LAYER_TYPES_WINDOW:
        return [window if kind == "sliding_attention" else None
                for kind in hf_config.layer_types]
    return [None] * num_layers


def window_problems(arch: str, hf_config) -> list[str]:
    """Config fields asking for attention this platform would get wrong."""
    problems = []
    if getattr(hf_config, "use_bidirectional_attention", False):
        problems.append(f"use_bidirectional_attention in a {arch} config "
                        "(only causal attention is supported)")
    if arch == "MistralForCausalLM" and getattr(hf_config, "layer_types", None):
        problems.append(
            "layer_types in a MistralForCausalLM config (transformers' Mistral ignores it and "
            "windows every layer, while per-layer windows are Ministral's; the model is ambiguous)"
        )
    if arch == "Gemma3ForCausalLM":
        problems += _gemma3_pattern_problems(hf_config)
    return problems


def _gemma3_pattern_problems(hf_config) -> list[str]:
    """mlx-lm's Gemma 3 picks its sliding layers, and their RoPE base, from
    ``sliding_window_pattern`` alone; transformers from ``layer_types``."""
    pattern = getattr(hf_config, "sliding_window_pattern", MLX_LM_GEMMA3_DEFAULT_PATTERN)
    periodic = ["sliding_attention" if (i + 1) % pattern else "full_attention"
                for i in range(hf_config.num_hidden_layers)]
    if list(hf_config.layer_types) == periodic:
        return []
    return [f"layer_types in a Gemma3ForCausalLM config that does not repeat "
            f"sliding_window_pattern={pattern} (mlx-lm's Gemma 3 follows the pattern)"]


class OwnWindowLayer(nn.Module):
    """A decoder layer that attends with the mask of its own window instead of the
    mask the backbone built for all layers; otherwise looks like the layer."""

    def __init__(self, layer: nn.Module, window: int | None):
        super().__init__()
        self.layer = layer
        self.window = window

    def __getattr__(self, key):
        try:
            return super().__getattr__(key)
        except AttributeError:
            return getattr(super().__getattr__("layer"), key)

    def __call__(self, x: mx.array, mask=None, cache=None, **kwargs):
        own_mask = cache.make_mask(x.shape[1], window_size=self.window)
        return self.layer(x, own_mask, cache, **kwargs)


def use_layer_windows(backbone: nn.Module, windows: list[int | None]) -> None:
    layers = backbone.layers
    if len(layers) != len(windows):
        raise ValueError(f"{len(windows)} layer windows for {len(layers)} layers")
    for index, window in enumerate(windows):
        layers[index] = OwnWindowLayer(layers[index], window)
