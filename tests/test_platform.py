"""Platform selection, settings and refusals: each fails fast with a message naming the fix."""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
from conftest import start_llm

from vllm_metal import envs
from vllm_metal.device import on_cuda
from vllm_metal.models.registry import SUPPORTED_ARCHITECTURES


def resolved_platform(**env) -> str:
    code = "from vllm.platforms import current_platform as p; print(type(p).__name__)"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env},
                         capture_output=True, text=True, timeout=120)
    return out.stdout.strip().splitlines()[-1]


def test_vllm_selects_the_mlx_platform_on_its_own():
    assert resolved_platform() == "MetalPlatform"


def test_use_mlx_0_hands_back_to_vllm():
    assert resolved_platform(VLLM_METAL_USE_MLX="0") == "CpuPlatform"


@pytest.mark.parametrize("name,bad", [
    ("VLLM_METAL_MEMORY_FRACTION", "1.5"),
    ("VLLM_METAL_MEMORY_FRACTION", "lots"),
    ("VLLM_METAL_BLOCK_SIZE", "17"),
    ("VLLM_MLX_DEVICE", "tpu"),
    ("VLLM_METAL_USE_MLX", "maybe"),
    ("VLLM_METAL_DEBUG", "2"),
])
def test_bad_setting_names_the_variable(monkeypatch, name, bad):
    monkeypatch.setenv(name, bad)
    with pytest.raises(envs.SettingError, match=name):
        envs.validate_all()


@pytest.mark.parametrize("name", ["VLLM_METAL_TRIALS", "VLLM_METAL_GEMV_KERNELS"])
def test_a_setting_name_that_does_not_exist_is_refused(monkeypatch, tiny_model, name):
    """A retired setting (VLLM_METAL_TRIALS) or a misspelt one is not ignored: the
    engine's configuration, built as `vllm serve` and `LLM(...)` build it, stops."""
    from vllm.engine.arg_utils import EngineArgs

    model = tiny_model("qwen3")
    monkeypatch.setenv(name, "1")
    with pytest.raises(envs.SettingError, match=f"{name}: no such setting"):
        envs.validate_all()
    with pytest.raises(Exception, match=f"{name}: no such setting"):
        EngineArgs(model=model, dtype="float32").create_engine_config()
    monkeypatch.delenv(name)
    monkeypatch.setenv("VLLM_METAL_VISIBLE_DEVICES", "0")  # vLLM's own, for the platform
    envs.validate_all()
    EngineArgs(model=model, dtype="float32").create_engine_config()


def test_settings_defaults(monkeypatch):
    for name in envs.SETTINGS:
        monkeypatch.delenv(name, raising=False)
    assert envs.VLLM_METAL_MEMORY_FRACTION is None  # auto: --gpu-memory-utilization
    assert envs.VLLM_METAL_BLOCK_SIZE == 16
    assert envs.VLLM_METAL_USE_MLX is True
    assert envs.VLLM_MLX_DEVICE == "gpu"
    assert envs.VLLM_METAL_DEBUG is False


def test_every_setting_is_in_the_documented_table():
    for name in envs.SETTINGS:
        assert f"| {name} |" in envs.__doc__


def test_bad_setting_stops_engine_startup(tiny_model, monkeypatch):
    monkeypatch.setenv("VLLM_METAL_BLOCK_SIZE", "17")
    with pytest.raises(Exception, match="VLLM_METAL_BLOCK_SIZE"):
        start_llm(tiny_model("qwen3"))


@pytest.mark.skipif(on_cuda(), reason="the kernels run on CUDA")
@pytest.mark.parametrize("setting", ["VLLM_METAL_PAGED_ATTENTION_KERNEL", "VLLM_METAL_GEMV_KERNEL",
                                     "VLLM_METAL_KV_WRITE_IN_PLACE",
                                     "VLLM_METAL_PAGED_ATTENTION_KEY_PER_LANE",
                                     "VLLM_METAL_FUSED_DECODE_BLOCK"])
def test_forcing_a_cuda_kernel_elsewhere_is_refused(tiny_model, monkeypatch, setting):
    monkeypatch.setenv(setting, "1")
    with pytest.raises(RuntimeError, match=f"{setting}=1 needs MLX's CUDA"):
        start_llm(tiny_model("qwen3"))


def test_in_place_kv_writes_without_compiled_decode_steps_are_refused(tiny_model, monkeypatch):
    monkeypatch.setenv("VLLM_METAL_KV_WRITE_IN_PLACE", "1")
    # vLLM's config validation wraps the platform's UnsupportedConfig (a ValueError).
    with pytest.raises(ValueError, match="VLLM_METAL_KV_WRITE_IN_PLACE=1 with --enforce-eager"):
        start_llm(tiny_model("qwen3"), enforce_eager=True)


def test_unsupported_architecture_is_refused_with_the_list(tiny_model, tmp_path):
    model_dir = tmp_path / "falcon"
    shutil.copytree(tiny_model("qwen3"), model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["architectures"] = ["FalconForCausalLM"]
    (model_dir / "config.json").write_text(json.dumps(config))
    start = time.monotonic()
    with pytest.raises(Exception) as info:
        start_llm(str(model_dir))
    assert time.monotonic() - start < 60
    message = str(info.value)
    assert "FalconForCausalLM" in message
    assert all(arch in message for arch in SUPPORTED_ARCHITECTURES)


@pytest.mark.parametrize("option,words", [
    ({"kv_cache_dtype": "fp8"}, "--kv-cache-dtype"),
    ({"enable_lora": True, "lora_dtype": "float16"}, "--lora-dtype"),
    ({"enable_lora": True, "specialize_active_lora": True}, "--specialize-active-lora"),
    ({"tensor_parallel_size": 4}, "2 KV heads, and both must divide"),
    ({"runner": "pooling"}, "only text generation"),
    ({"speculative_config": {"method": "draft_model", "num_speculative_tokens": 2}}, "ngram"),
])
def test_unsupported_options_are_refused(tiny_model, option, words):
    if "speculative_config" in option:
        option["speculative_config"]["model"] = tiny_model("qwen3")
    with pytest.raises(Exception, match=words):
        start_llm(tiny_model("qwen3"), **option)


@pytest.mark.parametrize("arch,fields,words", [
    ("mistral", {"sliding_window": 8, "layer_types": ["full_attention", "sliding_attention"]},
     "layer_types in a MistralForCausalLM"),
    ("gemma3_text", {"layer_types": ["full_attention", "sliding_attention"]},
     "layer_types in a Gemma3ForCausalLM config that does not repeat sliding_window_pattern=2"),
    ("gemma3_text", {"use_bidirectional_attention": True}, "use_bidirectional_attention"),
    ("deepseek_v3", {"scoring_func": "softmax"},
     "scoring_func='softmax' in a DeepseekV3ForCausalLM config"),
    ("deepseek_v3", {"topk_method": "greedy"}, "topk_method='greedy'"),
    ("gpt_oss", {"swiglu_limit": 5.0}, "swiglu_limit=5.0 in a GptOssForCausalLM config"),
])
def test_configs_it_would_get_wrong_are_refused(tiny_model, tmp_path, arch, fields, words):
    model_dir = tmp_path / arch
    shutil.copytree(tiny_model(arch), model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, **fields}))
    with pytest.raises(Exception, match=words):
        start_llm(str(model_dir))


def test_an_engine_exits_without_a_traceback(tiny_model, tmp_path):
    """`LLM(...)` as a user script has it, to the interpreter's exit: the engine's
    teardown ends quietly (vLLM's empties torch's accelerator caches, which raised
    where torch has no accelerator)."""
    script = tmp_path / "generate.py"
    script.write_text(
        "from vllm import LLM, SamplingParams\n"
        "if __name__ == '__main__':\n"
        f"    llm = LLM({tiny_model('qwen3')!r})\n"
        "    out = llm.generate(['Hello'], SamplingParams(max_tokens=4), use_tqdm=False)\n"
        "    print('generated', len(out[0].outputs[0].token_ids))\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "generated 4" in done.stdout
    assert "Traceback" not in output, output[output.index("Traceback") - 500:][:4000]
