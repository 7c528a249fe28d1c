"""Which Hugging Face architectures run, and on which mlx-lm model definition."""

# Hugging Face `architectures` entry -> mlx-lm model module (mlx_lm.models.<name>),
# or this project's module where mlx-lm's needs help (a dotted path).
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
    "DeepseekV3ForCausalLM": "deepseek_v3",  # Kimi K2 checkpoints declare it too
    "GptOssForCausalLM": "vllm_metal.models.gpt_oss",
}

# Multi-head latent attention: the cache holds one latent row per token.
LATENT_ATTENTION = {"DeepseekV3ForCausalLM"}

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


# Config fields mlx-lm's definition reads differently from transformers (or not at
# all): field -> the values both agree on.
AGREED_CONFIG_VALUES = {
    "DeepseekV3ForCausalLM": {
        "topk_method": {"noaux_tc"},
        "scoring_func": {"sigmoid"},
        "moe_layer_freq": {1},
    },
    "GptOssForCausalLM": {  # mlx-lm's SwiGLU has these constants
        "swiglu_alpha": {1.702},
        "swiglu_limit": {7.0},
    },
}


def config_problems(arch: str, hf_config) -> list[str]:
    """Config values of a supported architecture that this platform would run
    unlike the checkpoint's own model."""
    problems = []
    for field, agreed in AGREED_CONFIG_VALUES.get(arch, {}).items():
        value = getattr(hf_config, field, None)
        if value is not None and value not in agreed:
            problems.append(f"{field}={value!r} in a {arch} config (supported: "
                            + ", ".join(repr(v) for v in sorted(agreed)) + ")")
    return problems


def model_classes(arch: str):
    """mlx-lm's Model and ModelArgs for ``arch``: the module this table names, as vLLM
    picks its model class by architecture (mlx-lm's own choice follows model_type)."""
    import importlib

    check_architecture(arch)
    name = SUPPORTED_ARCHITECTURES[arch]
    module = importlib.import_module(name if "." in name else f"mlx_lm.models.{name}")
    return module.Model, module.ModelArgs
