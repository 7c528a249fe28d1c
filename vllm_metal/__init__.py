"""vLLM hardware platform plugin that runs models on Apple's MLX."""

__version__ = "0.1.0"


def register() -> str | None:
    """vLLM's ``vllm.platform_plugins`` entry point: our platform when MLX can run."""
    from vllm_metal import envs
    from vllm_metal.device import mlx_available

    try:
        if not envs.VLLM_METAL_USE_MLX:
            return None
    except envs.SettingError:
        pass  # vLLM swallows errors here; the platform's config check reports it

    if not mlx_available():
        return None
    return "vllm_metal.platform.MetalPlatform"
