"""Loading a checkpoint into an mlx-lm model: Hugging Face safetensors
directories (float or MLX-quantized) and GGUF files."""

import logging
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import torch

from vllm_metal import envs
from vllm_metal.models.gguf import load_gguf_model, resolve_gguf_file

logger = logging.getLogger("vllm.metal")

TORCH_TO_MX_DTYPE = {
    torch.float32: mx.float32,
    torch.float16: mx.float16,
    torch.bfloat16: mx.bfloat16,
}


def mx_dtype(torch_dtype: torch.dtype) -> mx.Dtype:
    return TORCH_TO_MX_DTYPE[torch_dtype]


def should_dequantize() -> bool:
    choice = envs.VLLM_METAL_DEQUANTIZE
    if choice == "auto":
        return mx.default_device().type == mx.cpu
    return choice == "1"


def load_model(model_path: str, torch_dtype: torch.dtype, transform=None) -> nn.Module:
    """``transform(model)`` runs before the weights are read (sharding keeps only
    this rank's slices)."""
    start = time.perf_counter()
    dtype = mx_dtype(torch_dtype)
    dequantize = should_dequantize()
    gguf_file = resolve_gguf_file(model_path)
    if gguf_file is not None:
        model, _ = load_gguf_model(gguf_file, dtype=dtype, dequantize=dequantize)
        was_quantized = True
    else:
        model, was_quantized = _load_hf_directory(Path(model_path), dtype, dequantize)
    if transform is not None:
        transform(model)
    mx.eval(model.parameters())
    if dequantize and was_quantized:
        logger.info(
            "Quantized weights were dequantized to %s at load: MLX's quantized "
            "kernels are slow on the CPU device (VLLM_METAL_DEQUANTIZE=0 keeps them)",
            dtype,
        )
    logger.info(
        "Loaded %s in %.1f s (%.2f GB of weights, dtype %s)",
        model_path,
        time.perf_counter() - start,
        weight_bytes(model) / 1e9,
        dtype,
    )
    return model


def _load_hf_directory(path: Path, dtype: mx.Dtype, dequantize: bool):
    from mlx_lm.utils import dequantize_model, load_model as mlx_lm_load_model

    model, config = mlx_lm_load_model(path, lazy=True, get_model_classes=_classes_by_architecture)
    quantized = "quantization" in config
    if quantized and dequantize:
        model = dequantize_model(model)
    cast_floating_weights(model, dtype)
    return model, quantized


def _classes_by_architecture(config: dict):
    """The mlx-lm module the registry names for the checkpoint's architecture, as vLLM
    picks its model by architecture (mlx-lm itself would follow ``model_type``)."""
    from vllm_metal.models.registry import model_classes

    architectures = config.get("architectures") or [""]
    return model_classes(architectures[0])


def cast_floating_weights(model: nn.Module, dtype: mx.Dtype) -> None:
    """Cast float weights to ``dtype``, leaving quantized weights (uint32) alone."""
    from mlx.utils import tree_map

    def cast(x):
        return x.astype(dtype) if mx.issubdtype(x.dtype, mx.floating) else x

    model.update(tree_map(cast, model.parameters()))


def weight_bytes(model: nn.Module) -> int:
    from mlx.utils import tree_flatten

    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))
