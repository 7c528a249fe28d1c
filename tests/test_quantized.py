"""MLX-quantized checkpoints (as mlx_lm.convert writes them) load and serve
unchanged, with the same greedy tokens as mlx-lm on the same files; the KV
cache grows by what quantization saves."""

import json
from pathlib import Path

import pytest
from conftest import start_llm, stop_llm
from vllm import SamplingParams
from vllm.inputs import TokensPrompt

from vllm_metal.testing.reference import mlx_lm_greedy

PROMPTS = [[5, 17, 42, 99, 123, 7, 300, 11], list(range(20, 90))]
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def quantized(tiny_model, tmp_path_factory):
    from mlx_lm import convert

    made = {}

    def make(arch: str, bits: int) -> str:
        if (arch, bits) not in made:
            out = tmp_path_factory.mktemp(f"{arch}-q{bits}") / "model"
            if arch in QUANTIZED_LIKE_MLX_COMMUNITY:
                quantize_like_mlx_community(tiny_model(arch), out, bits)
            else:
                convert(tiny_model(arch), mlx_path=str(out), quantize=True, q_group_size=32,
                        q_bits=bits, dtype="float32")
            made[arch, bits] = str(out)
        return made[arch, bits]

    return make


# mlx-community's gpt-oss: MXFP4 experts and attention, 8-bit router (mlx-lm's own
# predicate). mlx_lm.convert reads transformers' float gpt-oss files wrongly
# (vllm_metal/models/gpt_oss.py), so the checkpoint is quantized from the plugin's load.
QUANTIZED_LIKE_MLX_COMMUNITY = {"gpt_oss": "mxfp4"}


def quantize_like_mlx_community(model_dir: str, out: Path, bits: int) -> None:
    from mlx_lm.utils import load_model, load_tokenizer, quantize_model, save

    from vllm_metal.models.loader import _classes_by_architecture

    model, config = load_model(Path(model_dir), get_model_classes=_classes_by_architecture)
    arch = config["model_type"]
    model, config = quantize_model(model, config, 32, bits, mode=QUANTIZED_LIKE_MLX_COMMUNITY[arch],
                                   quant_predicate=model.quant_predicate)
    save(out, model_dir, model, load_tokenizer(Path(model_dir)), config)


def generate(model_dir):
    llm = start_llm(model_dir)
    try:
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in PROMPTS], GREEDY)
        return [list(o.outputs[0].token_ids) for o in outs], llm.llm_engine.vllm_config
    finally:
        stop_llm(llm)


@pytest.mark.parametrize("arch,bits", [("qwen3", 4), ("llama", 8), ("deepseek_v3", 4),
                                       ("gpt_oss", 4)])
@pytest.mark.parametrize("dequantize", ["0", "1"])
def test_greedy_matches_mlx_lm_on_the_same_files(quantized, monkeypatch, arch, bits, dequantize):
    monkeypatch.setenv("VLLM_METAL_DEQUANTIZE", dequantize)
    model_dir = quantized(arch, bits)
    got, _ = generate(model_dir)
    assert got == [mlx_lm_greedy(model_dir, p, GREEDY.max_tokens) for p in PROMPTS]


# What VLLM_METAL_MEMORY_FRACTION grants this engine for weights + KV cache, set as
# a fraction of the same total the worker reads, so the block counts do not depend
# on the machine's memory.
WEIGHTS_AND_KV_BYTES = 256 * 1024**2


def fraction_granting(nbytes: int) -> str:
    import psutil

    from vllm_metal.memory import ACTIVATION_RESERVE_BYTES

    return repr((nbytes + ACTIVATION_RESERVE_BYTES) / psutil.virtual_memory().total)


def checkpoint_bytes(model_dir: str) -> int:
    import mlx.core as mx

    files = Path(model_dir).glob("*.safetensors")
    return sum(v.nbytes for f in files for v in mx.load(str(f)).values())


def float32_block_bytes(model_dir: str) -> int:
    config = json.loads((Path(model_dir) / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    # K and V, every layer, 16 tokens a block.
    return 2 * config["num_hidden_layers"] * 16 * config["num_key_value_heads"] * head_dim * 4


def test_kv_capacity_is_what_the_weights_leave(quantized, tiny_model, monkeypatch):
    """The same grant: the KV cache gets what the weights leave of it, in whole
    blocks, so the 4-bit checkpoint gets more blocks by what quantization saves."""
    from vllm import LLM

    monkeypatch.setenv("VLLM_METAL_DEQUANTIZE", "0")
    monkeypatch.setenv("VLLM_METAL_MEMORY_FRACTION", fraction_granting(WEIGHTS_AND_KV_BYTES))
    blocks, expected = {}, {}
    for name, path in (("dense", tiny_model("qwen3")), ("q4", quantized("qwen3", 4))):
        # 256 requests of 4096 tokens could fill more than the grant: the grant binds.
        llm = LLM(path, max_model_len=4096, dtype="float32")
        try:
            blocks[name] = llm.llm_engine.vllm_config.cache_config.num_gpu_blocks
        finally:
            stop_llm(llm)
        left = WEIGHTS_AND_KV_BYTES - checkpoint_bytes(path)
        expected[name] = left // float32_block_bytes(path)
    # One block of slack: the fraction's float rounding can cost a byte.
    assert all(abs(blocks[n] - expected[n]) <= 1 for n in blocks), (blocks, expected)
    assert blocks["q4"] - blocks["dense"] > 10
