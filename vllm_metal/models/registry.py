"""Which Hugging Face architectures run, and on which mlx-lm model definition."""

# Hugging Face `architectures` entry -> mlx-lm model module (mlx_lm.models.<name>).
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "MixtralForCausalLM": "mixtral",
    "Phi3ForCausalLM": "phi3",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3_text",
}

# mlx-lm attention that applies the mask to grouped-query scores
# [B, kv_heads, q_per_kv, L, S], so a per-sequence mask needs that rank too.
GROUPED_SCORE_MASK = {"Gemma2ForCausalLM"}


class UnsupportedModel(ValueError):
    pass


def check_architecture(arch: str) -> None:
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModel(
            f"vllm-metal cannot run architecture {arch!r}. Supported: "
            + ", ".join(sorted(SUPPORTED_ARCHITECTURES))
            + ". Set VLLM_METAL_USE_MLX=0 to use vLLM's own platform instead."
        )


def model_classes(arch: str):
    """mlx-lm's Model and ModelArgs for ``arch``: the module this table names, as vLLM
    picks its model class by architecture (mlx-lm's own choice follows model_type)."""
    import importlib

    check_architecture(arch)
    module = importlib.import_module(f"mlx_lm.models.{SUPPORTED_ARCHITECTURES[arch]}")
    return module.Model, module.ModelArgs
