"""This machine's memory bandwidth, and the decode ceiling it sets.

A decode step must read every weight once (plus the KV cache so far), so one
stream cannot run faster than ``bandwidth / bytes read per step``. The ceiling
uses the best large-buffer read rate seen (the most favourable one, so the
percentages are conservative); the copy rate is reported beside it.
"""

import json
import struct
import time
from pathlib import Path

import numpy as np

SAFETENSORS_ITEMSIZE = {"F32": 4, "BF16": 2, "F16": 2, "F64": 8, "I64": 8, "I32": 4, "U32": 4, "U8": 1}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def best_seconds(fn, repeats: int) -> float:
    """The fastest of ``repeats`` calls, after one untimed call (pages touched,
    first-call costs paid): limits are measured generously."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _torch_sum_seconds(tensor, threads: int, repeats: int) -> float:
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return best_seconds(lambda: tensor.sum(), repeats)
    finally:
        torch.set_num_threads(saved)


def measure(buffer_bytes: int = 1 << 30, repeats: int = 7) -> dict:
    """GB/s for a numpy copy (bytes read + written), a torch sum on one thread and
    on all, and a numpy matrix-vector product (bytes read)."""
    import torch

    side = int((buffer_bytes // 4) ** 0.5)
    matrix = np.ones((side, side), dtype=np.float32)
    vector = np.ones(side, dtype=np.float32)
    target = np.empty_like(matrix)
    nbytes = matrix.nbytes
    tensor = torch.from_numpy(matrix)
    rates = {
        "copy_gb_s": 2 * nbytes / best_seconds(lambda: np.copyto(target, matrix), repeats) / 1e9,
        "sum_gb_s": nbytes / _torch_sum_seconds(tensor, torch.get_num_threads(), repeats) / 1e9,
        "sum_1_thread_gb_s": nbytes / _torch_sum_seconds(tensor, 1, repeats) / 1e9,
        "gemv_gb_s": nbytes / best_seconds(lambda: matrix @ vector, repeats) / 1e9,
    }
    rates = {k: round(v, 2) for k, v in rates.items()}
    return {**rates, "bandwidth_gb_s": max(rates.values()), "buffer_bytes": nbytes}


def _tensors(model_dir: Path) -> dict[str, tuple[int, int]]:
    """name -> (elements, bytes per element as stored)."""
    tensors = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
        for name, info in header.items():
            if name != "__metadata__":
                tensors[name] = (int(np.prod(info["shape"], dtype=np.int64)),
                                 SAFETENSORS_ITEMSIZE[info["dtype"]])
    return tensors


def weight_bytes_per_step(model_dir: Path, dtype: str | None) -> int:
    """Weights one decode step reads, at ``dtype`` (None: as stored, e.g. packed
    4-bit): all of them, except an untied input embedding (a lookup reads one
    row; a tied one is read as the LM head)."""
    tensors = _tensors(model_dir)
    untied = any(name.startswith("lm_head.") for name in tensors)
    return sum(n * (DTYPE_BYTES[dtype] if dtype else itemsize)
               for name, (n, itemsize) in tensors.items()
               if not (untied and "embed_tokens" in name))


def kv_bytes_per_step(model_dir: Path, dtype: str, context_tokens: float) -> float:
    config = json.loads((model_dir / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads", config["num_attention_heads"])
    per_token = 2 * config["num_hidden_layers"] * kv_heads * head_dim * DTYPE_BYTES[dtype]
    return per_token * context_tokens


def decode_ceiling(model_dir: Path, dtype: str, prompt_len: int, new_tokens: int,
                   bandwidth_gb_s: float, weights_as_stored: bool = False) -> dict:
    """Tokens/s one stream could reach if each step only had to read its bytes."""
    mean_context = prompt_len + new_tokens / 2
    weights = weight_bytes_per_step(model_dir, None if weights_as_stored else dtype)
    kv = kv_bytes_per_step(model_dir, dtype, mean_context)
    return {
        "weight_bytes": weights,
        "kv_bytes": kv,
        "ceiling_tok_s": bandwidth_gb_s * 1e9 / (weights + kv),
    }
