"""Every vLLM engine option is honoured or refused at startup, naming the option.

The engine configuration is built the way `vllm serve` and `LLM(...)` build it
(``EngineArgs.create_engine_config``, which runs the platform's checks)."""

import dataclasses
import os

import pytest
from vllm.engine.arg_utils import EngineArgs

from vllm_metal.options import HONOURED, NOT_APPLICABLE, OPTIONS, REFUSED, flag

# A value other than the default for each refused option, and what else it needs
# to get past vLLM's own checks to the platform's.
REFUSED_EXAMPLES = {
    "enable_return_routed_experts": {"enable_return_routed_experts": True},
    "return_sampling_mask": {"return_sampling_mask": True},
    "model_weights": {"model_weights": "s3://bucket/weights"},
    "hf_config_path": {"hf_config_path": "{model}"},
    "runner": {"runner": "pooling"},
    "convert": {"convert": "embed"},
    "enable_prompt_embeds": {"enable_prompt_embeds": True},
    "safetensors_load_strategy": {"safetensors_load_strategy": "eager"},
    "safetensors_prefetch_num_threads": {"safetensors_prefetch_num_threads": 2},
    "safetensors_prefetch_block_size": {"safetensors_prefetch_block_size": 1 << 20},
    "load_format": {"load_format": "dummy"},
    "config_format": {"config_format": "mistral"},
    "kv_cache_dtype": {"kv_cache_dtype": "fp8"},
    "hf_overrides": {"hf_overrides": {"max_position_embeddings": 2048}},
    "model_class_overrides": {"model_class_overrides": {"UnusedForCausalLM": "vllm.model_executor.models.qwen3:Qwen3ForCausalLM"}},
    "quantization": {"quantization": "fp8"},
    "quantization_config": {"quantization_config": {"ignore": ["lm_head"]}},
    "model_impl": {"model_impl": "transformers"},
    "model_loader_extra_config": {"model_loader_extra_config": {"key": 1}},
    "ignore_patterns": {"ignore_patterns": ["*.bin"]},
    "pt_load_map_location": {"pt_load_map_location": "meta"},
    "max_parallel_loading_workers": {"max_parallel_loading_workers": 2},
    "disable_sliding_window": {"disable_sliding_window": True},
    "use_fp64_gumbel": {"use_fp64_gumbel": True},
    "enable_trace_replay": {"enable_trace_replay": True},
    "aux_output_config": {"aux_output_config": {"enable_return_routed_experts": True}},
    "reasoning_config": {"reasoning_config": {"reasoning_start_str": "<think>",
                                              "reasoning_end_str": "</think>"}},
    "watermark_config": {"watermark_config": {"key": 1}},
    "diffusion_config": {"diffusion_config": {"canvas_length": 8}},
    "distributed_executor_backend": {"distributed_executor_backend": "external_launcher"},
    "numa_bind": {"numa_bind": True},
    "ray_workers_use_nsight": {"ray_workers_use_nsight": True,
                               "distributed_executor_backend": "ray"},
    "device_ids": {"device_ids": [0]},
    "prefill_context_parallel_size": {"prefill_context_parallel_size": 2},
    "decode_context_parallel_size": {"decode_context_parallel_size": 2,
                                     "tensor_parallel_size": 2},
    "data_parallel_size": {"data_parallel_size": 2},
    "enable_hc_sp": {"enable_hc_sp": True},
    "enable_expert_parallel": {"enable_expert_parallel": True, "model": "qwen3_moe"},
    "enable_batch_sharded_sampling": {"enable_batch_sharded_sampling": True,
                                      "tensor_parallel_size": 2},
    "enable_eplb": {"enable_eplb": True},
    "enable_elastic_ep": {"enable_elastic_ep": True},
    "enable_dbo": {"enable_dbo": True},
    "ubatch_size": {"ubatch_size": 2},
    "enable_fault_tolerance": {"enable_fault_tolerance": True},
    "kv_sharing_fast_prefill": {"kv_sharing_fast_prefill": True},
    "kv_offloading_size": {"kv_offloading_size": 1.0},
    "kv_transfer_config": {"kv_transfer_config": {"kv_connector": "ExampleConnector",
                                                  "kv_role": "kv_both"}},
    "ec_transfer_config": {"ec_transfer_config": {"ec_connector": "ECExampleConnector",
                                                  "ec_role": "ec_both"}},
    "offload_backend": {"offload_backend": "uva"},
    "cpu_offload_gb": {"cpu_offload_gb": 1},
    "offload_group_size": {"offload_group_size": 2},
    "enable_sleep_mode": {"enable_sleep_mode": True},
    "enable_cumem_allocator": {"enable_cumem_allocator": True},
    "enable_nccl_comm_suspend": {"enable_nccl_comm_suspend": True},
    "weight_transfer_config": {"weight_transfer_config": {"backend": "nccl"}},
    "optimization_level": {"optimization_level": 3},
    "performance_mode": {"performance_mode": "throughput"},
    "compilation_config": {"compilation_config": {"mode": 3}},
    "cudagraph_capture_sizes": {"cudagraph_capture_sizes": [1, 2]},
    "max_cudagraph_capture_size": {"max_cudagraph_capture_size": 8},
    "ir_op_priority": {"ir_op_priority": {"rms_norm": ["native"]}},
    "kernel_config": {"kernel_config": {"enable_cutedsl_warmup": False}},
    "enable_flashinfer_autotune": {"enable_flashinfer_autotune": True},
    "moe_backend": {"moe_backend": "triton"},
    "linear_backend": {"linear_backend": "cutlass"},
    "sparse_indexer_topk_backend": {"sparse_indexer_topk_backend": "per_row"},
    "attention_backend": {"attention_backend": "FLASH_ATTN"},
    "attention_config": {"attention_config": {"flash_attn_version": 3}},
    "engram_config": {"engram_config": {"cpu_offload": False}},
    "additional_config": {"additional_config": {"key": 1}},
    "lora_dtype": {"enable_lora": True, "lora_dtype": "float16"},
    "specialize_active_lora": {"enable_lora": True, "specialize_active_lora": True},
    "enable_mixed_moe_lora_format": {"enable_lora": True, "enable_mixed_moe_lora_format": True},
    "enable_moe_shared_loras": {"enable_lora": True, "enable_moe_shared_loras": True},
    "collect_detailed_traces": {"collect_detailed_traces": ["model"],
                                "otlp_traces_endpoint": "http://127.0.0.1:4317"},
    "cudagraph_metrics": {"cudagraph_metrics": True},
    "enable_layerwise_nvtx_tracing": {"enable_layerwise_nvtx_tracing": True},
    "profiler_config": {"profiler_config": {"profiler": "torch",
                                            "torch_profiler_dir": "/tmp/vllm-metal-profile"}},
}

# Refused by vLLM itself on this platform before the platform is asked, with vLLM's
# own message (the platform's check stays for when vLLM lets them through).
REFUSED_BY_VLLM_FIRST = {
    "enable_sleep_mode": "Sleep mode is not supported",
    "enable_cumem_allocator": "cumem allocator is not supported",
    "enable_eplb": "Expert parallelism load balancing is only supported on CUDA",
    "enable_elastic_ep": "Elastic EP is only supported with enable_eplb=True",
    "enable_fault_tolerance": "Fault tolerance requires external load balancer mode",
    "enable_trace_replay": "trace replay requires Model Runner V2",
    "return_sampling_mask": "sampling distribution replay requires Model Runner V2",
    "engram_config": "EngramConfig requires a model with supported Engram embeddings",
    "config_format": "Failed to load mistral 'params.json' config",
}


def engine_config(model: str, **options):
    return EngineArgs(model=model, dtype="float32", **options).create_engine_config()


def test_every_engine_option_is_classified():
    names = {f.name for f in dataclasses.fields(EngineArgs)}
    assert sorted(names - OPTIONS.keys()) == []
    assert sorted(OPTIONS.keys() - names) == []
    assert {o.status for o in OPTIONS.values()} == {HONOURED, REFUSED, NOT_APPLICABLE}


def test_every_refused_option_has_an_example():
    refused = {name for name, o in OPTIONS.items() if o.status == REFUSED}
    assert sorted(refused ^ REFUSED_EXAMPLES.keys()) == []


def test_defaults_start(tiny_model):
    config = engine_config(tiny_model("qwen3"))
    assert config.parallel_config.distributed_executor_backend == "uni"


@pytest.mark.parametrize("name", sorted(REFUSED_EXAMPLES))
def test_refused_option_stops_startup_naming_it(tiny_model, name):
    options = dict(REFUSED_EXAMPLES[name])
    model = tiny_model(options.pop("model", "qwen3"))
    options = {k: (v.format(model=model) if isinstance(v, str) else v) for k, v in options.items()}
    with pytest.raises(Exception) as info:
        engine_config(model, **options)
    expected = REFUSED_BY_VLLM_FIRST.get(name, flag(name))
    assert expected in str(info.value), str(info.value)[-2000:]


@pytest.mark.parametrize("options", [
    {"optimization_level": 0},
    {"enforce_eager": True},
    {"compilation_config": {"mode": 0, "cudagraph_mode": "NONE"}},
    {"load_format": "safetensors"},
    {"distributed_executor_backend": "mp"},
    {"distributed_executor_backend": "ray"},
    {"reasoning_parser": "qwen3"},
    {"enable_lora": True, "max_loras": 2, "max_lora_rank": 8, "max_cpu_loras": 4,
     "lora_dtype": "auto", "lora_target_modules": ["q_proj"]},
])
def test_settings_the_platform_runs_anyway_are_accepted(tiny_model, options):
    config = engine_config(tiny_model("qwen3"), **options)
    backend = config.parallel_config.distributed_executor_backend
    if options.get("distributed_executor_backend") == "mp":
        assert backend == "mp"
    if options.get("distributed_executor_backend") == "ray":
        # vLLM's Ray executor with this plugin's worker class (tests/test_ray.py runs it)
        assert backend.__name__ == "MetalRayExecutor" and config.parallel_config.use_ray


def test_fork_start_method_is_refused(tiny_model, monkeypatch):
    monkeypatch.setenv("VLLM_WORKER_MULTIPROC_METHOD", "fork")
    with pytest.raises(Exception, match="VLLM_WORKER_MULTIPROC_METHOD=fork"):
        engine_config(tiny_model("qwen3"))


def test_spawn_start_method_is_accepted(tiny_model, monkeypatch):
    monkeypatch.setenv("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    engine_config(tiny_model("qwen3"))
    assert os.environ["VLLM_WORKER_MULTIPROC_METHOD"] == "spawn"


def test_mp_executor_runs_a_single_rank(tiny_model):
    from conftest import start_llm, stop_llm
    from vllm import SamplingParams

    llm = start_llm(tiny_model("qwen3"), distributed_executor_backend="mp")
    try:
        assert llm.llm_engine.vllm_config.parallel_config.distributed_executor_backend == "mp"
        out = llm.generate(["The river"], SamplingParams(max_tokens=4, temperature=0))
    finally:
        stop_llm(llm)
    assert len(out[0].outputs[0].token_ids) == 4


def test_docs_list_the_table():
    from pathlib import Path

    from vllm_metal.options import markdown_table

    doc = Path(__file__).parent.parent / "docs" / "options.md"
    assert doc.read_text() == markdown_table(), "run: python -m vllm_metal.options > docs/options.md"
