"""MLX-quantized checkpoints (as mlx_lm.convert writes them) load and serve
unchanged, with the same greedy tokens as mlx-lm on the same files; the KV
cache grows by what quantization saves."""

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
            convert(tiny_model(arch), mlx_path=str(out), quantize=True, q_group_size=32,
                    q_bits=bits, dtype="float32")
            made[arch, bits] = str(out)
        return made[arch, bits]

    return make


def generate(model_dir):
    llm = start_llm(model_dir)
    try:
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in PROMPTS], GREEDY)
        return [list(o.outputs[0].token_ids) for o in outs], llm.llm_engine.vllm_config
    finally:
        stop_llm(llm)


@pytest.mark.parametrize("arch,bits", [("qwen3", 4), ("llama", 8)])
@pytest.mark.parametrize("dequantize", ["0", "1"])
def test_greedy_matches_mlx_lm_on_the_same_files(quantized, monkeypatch, arch, bits, dequantize):
    monkeypatch.setenv("VLLM_METAL_DEQUANTIZE", dequantize)
    model_dir = quantized(arch, bits)
    got, _ = generate(model_dir)
    assert got == [mlx_lm_greedy(model_dir, p, GREEDY.max_tokens) for p in PROMPTS]


def test_kv_capacity_reflects_smaller_weights(quantized, tiny_model, monkeypatch):
    from vllm import LLM

    monkeypatch.setenv("VLLM_METAL_DEQUANTIZE", "0")
    monkeypatch.setenv("VLLM_METAL_MEMORY_FRACTION", "0.03")
    blocks = {}
    for name, path in (("dense", tiny_model("qwen3")), ("q4", quantized("qwen3", 4))):
        llm = LLM(path, max_model_len=256, dtype="float32")
        try:
            blocks[name] = llm.llm_engine.vllm_config.cache_config.num_gpu_blocks
        finally:
            stop_llm(llm)
    assert blocks["q4"] > blocks["dense"] > 0
