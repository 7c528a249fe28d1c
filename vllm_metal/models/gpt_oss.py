"""gpt-oss on mlx-lm's definition, with two corrections.

- transformers' float checkpoints store the experts as ``[experts, in, out]``
  (``x @ w``) under names without ``.weight``; MLX's are ``[experts, out, in]``.
  They are renamed and transposed before mlx-lm splits gate from up.
- gpt-oss's YaRN RoPE sets ``truncate: false``: the ramp between interpolated
  and extrapolated frequencies starts and ends at fractional dimensions.
  mlx-lm rounds them outwards (as DeepSeek's YaRN does), which moves logits by
  ~1e-2 within a few dozen tokens; the frequencies are recomputed unrounded.
"""

import math

import mlx.core as mx
from mlx_lm.models import gpt_oss

ModelArgs = gpt_oss.ModelArgs
FLOAT_EXPERT_SUFFIXES = (".experts.gate_up_proj", ".experts.down_proj")


class Model(gpt_oss.Model):
    def __init__(self, args: ModelArgs):
        super().__init__(args)
        scaling = args.rope_scaling or {}
        if scaling.get("rope_type", scaling.get("type")) == "yarn" and not scaling.get(
                "truncate", True):
            periods = unrounded_yarn_periods(args.head_dim, args.rope_theta, scaling)
            for layer in self.model.layers:
                layer.self_attn.rope._freqs = periods

    def sanitize(self, weights: dict) -> dict:
        renamed = {}
        for name, value in weights.items():
            if name.endswith(FLOAT_EXPERT_SUFFIXES):
                name, value = name + ".weight", mx.swapaxes(value, -1, -2)
            renamed[name] = value
        return super().sanitize(renamed)


def unrounded_yarn_periods(dims: int, base: float, scaling: dict) -> mx.array:
    """Per rotary pair, the period (1 / angular frequency) ``mx.fast.rope`` takes:
    original frequencies below dimension ``low``, frequencies divided by
    ``factor`` above ``high``, a linear blend between."""
    factor = scaling["factor"]
    original_length = scaling["original_max_position_embeddings"]
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def dimension_with(rotations: float) -> float:
        return dims * math.log(original_length / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = max(dimension_with(beta_fast), 0.0), min(dimension_with(beta_slow), dims - 1.0)
    if high == low:
        high += 0.001
    pairs = mx.arange(dims // 2, dtype=mx.float32)
    interpolated = mx.clip((pairs - low) / (high - low), 0.0, 1.0)
    original = 1.0 / base ** (2 * pairs / dims)
    frequencies = original * (1 - interpolated) + (original / factor) * interpolated
    return 1.0 / frequencies
