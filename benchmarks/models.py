"""The checkpoints the suite runs, written once under ``benchmarks/.models/``.

- ``qwen3-0.6b-bf16``: Qwen3-0.6B-shaped random weights (bfloat16), from
  ``vllm_metal.testing.tiny_models``; the float32 runs cast it at load.
- ``smollm2-135m-f32``: SmolLM2-135M-Instruct (the GGUF under ``models/``)
  dequantized to a plain float32 Hugging Face folder, so that every engine
  (the plugin, mlx-lm, vLLM's CPU backend) loads the very same weights.
- ``tiny-qwen3``: a 2-layer, 64-wide random Qwen3 for the smoke run.
- ``<name>-4bit``: any of them quantized to MLX 4-bit by ``mlx_lm.convert``
  (group 64, float32 scales: MLX's CPU kernels are far slower with bfloat16 ones).

MLX is only imported in a child process (``python -m benchmarks.models``).
"""

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODELS_DIR = REPO / "benchmarks" / ".models"
SMOLLM2_SERVING_DIR = REPO / "models" / "SmolLM2-135M-Instruct"
SMOLLM2_SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json",
                      "tokenizer_config.json", "chat_template.jinja")


def _ready(path: Path) -> bool:
    return (path / "config.json").exists() and (path / "model.safetensors").exists()


def qwen3_0_6b() -> Path:
    path = MODELS_DIR / "qwen3-0.6b-bf16"
    if not _ready(path):
        from vllm_metal.testing.tiny_models import write_tiny_model

        write_tiny_model("qwen3", path, dtype="bfloat16", preset="qwen3-0.6b")
    return path


def tiny_qwen3() -> Path:
    path = MODELS_DIR / "tiny-qwen3"
    if not _ready(path):
        from vllm_metal.testing.tiny_models import write_tiny_model

        write_tiny_model("qwen3", path, dtype="float32")
    return path


def smollm2_f32() -> Path:
    path = MODELS_DIR / "smollm2-135m-f32"
    if not _ready(path):
        if not (SMOLLM2_SERVING_DIR / "config.json").exists():
            subprocess.run([sys.executable, "-m", "vllm_metal.models.gguf", "",
                            str(SMOLLM2_SERVING_DIR)], check=True, cwd=REPO)
        subprocess.run([sys.executable, "-m", "benchmarks.models", "smollm2", str(path)],
                       check=True, cwd=REPO)
    return path


PREPARERS = {"qwen3-0.6b": qwen3_0_6b, "smollm2-135m": smollm2_f32, "tiny-qwen3": tiny_qwen3}


def quantized_4bit(name: str) -> Path:
    path = MODELS_DIR / name
    if not _ready(path):
        base = prepare(name.removesuffix("-4bit"))
        shutil.rmtree(path, ignore_errors=True)  # mlx_lm.convert refuses an existing folder
        subprocess.run([sys.executable, "-m", "benchmarks.models", "quantize", str(base), str(path)],
                       check=True, cwd=REPO)
    return path


def prepare(name: str) -> Path:
    if name.endswith("-4bit"):
        return quantized_4bit(name)
    return PREPARERS[name]()


def tokenizer_vocab_size(path: Path) -> int:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path / "tokenizer.json")).get_vocab_size()


def _write_smollm2_f32(out: Path) -> None:
    """Dequantize the GGUF with the plugin's own loader and save float32 safetensors."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from vllm_metal.models.gguf import load_gguf_model, resolve_gguf_file

    model, _ = load_gguf_model(resolve_gguf_file(SMOLLM2_SERVING_DIR), dtype=mx.float32,
                               dequantize=True)
    out.mkdir(parents=True, exist_ok=True)
    for name in SMOLLM2_SIDE_FILES:
        if (SMOLLM2_SERVING_DIR / name).exists():
            shutil.copy(SMOLLM2_SERVING_DIR / name, out / name)
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "pt"})


if __name__ == "__main__":
    if sys.argv[1:2] == ["smollm2"]:
        _write_smollm2_f32(Path(sys.argv[2]))
    elif sys.argv[1:2] == ["quantize"]:
        from mlx_lm import convert

        convert(sys.argv[2], mlx_path=sys.argv[3], quantize=True, q_bits=4, q_group_size=64,
                dtype="float32")
    else:
        print(prepare(sys.argv[1]))
