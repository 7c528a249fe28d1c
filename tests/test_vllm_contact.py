"""The vLLM internals this plugin touches, pinned to vLLM 0.32.0. A vLLM upgrade
that moves any of them fails here first, with the name of what moved."""

import dataclasses
import importlib.metadata
import inspect

import pytest


def test_pinned_vllm_version():
    import vllm

    assert vllm.__version__.startswith("0.32.0")
    assert importlib.metadata.version("vllm").startswith("0.32.0")  # the `vllm` CLI needs it


def params(obj) -> set[str]:
    return set(inspect.signature(obj).parameters)


def fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def test_platform_hooks():
    from vllm.platforms.interface import Platform

    for hook in ("check_and_update_config", "verify_model_arch", "import_kernels",
                 "get_device_total_memory", "manual_seed_all", "get_attn_backend_cls",
                 "is_pin_memory_available", "get_device_communicator_cls", "inference_mode"):
        assert hasattr(Platform, hook), hook
    for attr in ("device_type", "dispatch_key", "ray_device_key", "device_control_env_var",
                 "supported_quantization", "dist_backend"):
        assert hasattr(Platform, attr) or attr in Platform.__annotations__, attr


def test_worker_interface():
    from vllm.v1.worker.worker_base import CompilationTimes, WorkerBase

    assert params(WorkerBase.__init__) >= {"vllm_config", "local_rank", "rank",
                                           "distributed_init_method", "is_driver_worker"}
    for method in ("init_device", "load_model", "get_kv_cache_spec", "execute_model",
                   "sample_tokens", "compile_or_warm_up_model", "get_supported_kv_cache_layouts",
                   "synchronize_device"):
        assert hasattr(WorkerBase, method), method
    assert CompilationTimes._fields == ("language_model", "encoder")


def test_scheduler_output_fields():
    from vllm.v1.core.sched.output import CachedRequestData, NewRequestData, SchedulerOutput

    assert fields(NewRequestData) >= {"req_id", "prompt_token_ids", "sampling_params",
                                      "block_ids", "num_computed_tokens", "mm_features",
                                      "lora_request"}
    assert fields(CachedRequestData) >= {"req_ids", "resumed_req_ids", "new_block_ids",
                                         "num_computed_tokens", "num_output_tokens",
                                         "new_token_ids", "all_token_ids"}
    assert fields(SchedulerOutput) >= {"scheduled_new_reqs", "scheduled_cached_reqs",
                                       "num_scheduled_tokens", "total_num_scheduled_tokens",
                                       "finished_req_ids"}


def test_input_batch_and_sampler():
    from vllm.v1.sample.sampler import Sampler
    from vllm.v1.worker.gpu_input_batch import CachedRequestState, InputBatch

    assert params(InputBatch.__init__) >= {"max_num_reqs", "max_model_len",
                                           "max_num_batched_tokens", "device", "vocab_size",
                                           "block_sizes", "max_num_blocks_per_req",
                                           "logitsprocs", "is_pooling_model"}
    for method in ("add_request", "remove_request", "condense", "refresh_metadata"):
        assert hasattr(InputBatch, method), method
    assert fields(CachedRequestState) >= {"req_id", "prompt_token_ids", "sampling_params",
                                          "generator", "block_ids", "num_computed_tokens",
                                          "output_token_ids", "in_progress_prompt_logprobs_cpu"}
    for method in ("compute_logprobs", "gather_logprobs"):
        assert hasattr(Sampler, method), method


def test_outputs_and_kv_spec():
    from vllm.v1.kv_cache_interface import FullAttentionSpec
    from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, LogprobsTensors, ModelRunnerOutput

    assert fields(ModelRunnerOutput) >= {"req_ids", "req_id_to_index", "sampled_token_ids",
                                         "logprobs", "prompt_logprobs_dict"}
    assert isinstance(EMPTY_MODEL_RUNNER_OUTPUT, ModelRunnerOutput)
    assert hasattr(LogprobsTensors, "empty_cpu")
    assert fields(FullAttentionSpec) >= {"block_size", "num_kv_heads", "head_size", "dtype"}


def test_structured_output_and_logitsprocs():
    from vllm.v1.sample.logits_processor import build_logitsprocs
    from vllm.v1.structured_output.utils import apply_grammar_bitmask

    assert params(apply_grammar_bitmask) == {"scheduler_output", "grammar_output",
                                             "input_batch", "logits"}
    order = list(inspect.signature(build_logitsprocs).parameters)
    assert order[:4] == ["vllm_config", "device", "is_pin_memory", "is_pooling_model"]


@pytest.mark.parametrize("group,name,value", [
    ("vllm.platform_plugins", "metal", "vllm_metal:register"),
    ("vllm.general_plugins", "metal_startup_messages", "vllm_metal.startup_messages:install"),
])
def test_entry_point_registered(group, name, value):
    names = {ep.name: ep.value for ep in importlib.metadata.entry_points(group=group)}
    assert names.get(name) == value


def test_startup_message_contact():
    """vllm_metal.startup_messages wraps two functions vLLM calls before any platform
    hook: the hub-id resolution in EngineArgs.__post_init__ (right after the general
    plugins load) and the Ray check in ParallelConfig's validator."""
    from vllm.config import parallel
    from vllm.engine import arg_utils
    from vllm.v1.executor import ray_utils

    post_init = inspect.getsource(arg_utils.EngineArgs.__post_init__)
    assert post_init.index("load_general_plugins()") < post_init.index("get_model_path(")
    assert params(arg_utils.get_model_path) == {"model", "revision"}
    assert "ray_utils.assert_ray_available()" in inspect.getsource(parallel.ParallelConfig)
    assert callable(ray_utils.assert_ray_available) and hasattr(ray_utils, "ray")


def test_ray_executor_contact():
    """vllm_metal.distributed.ray_executor subclasses vLLM's Ray executor V2, swaps the
    worker class it instantiates, bounds its placement-group wait, and extends its
    actors' runtime env."""
    from vllm import envs as vllm_envs
    from vllm.v1.executor import ray_executor_v2, ray_utils

    init = inspect.getsource(ray_executor_v2.RayExecutorV2._init_executor)
    assert "ray.remote(RayWorkerProc)" in init
    assert "initialize_ray_cluster(self.parallel_config, require_gpu_on_driver=False)" in init
    assert "self._build_runtime_env()" in init
    assert "get_node_and_physical_gpu_ids" in init
    worker = ray_executor_v2.RayWorkerProc
    assert params(worker.get_node_and_physical_gpu_ids) == {"self"}
    assert "ray.util.get_node_ip_address()" in inspect.getsource(worker.create_dist_init_method)
    assert ray_utils.PG_WAIT_TIMEOUT == 1800
    assert "PG_WAIT_TIMEOUT" in inspect.getsource(ray_utils._wait_until_pg_ready)
    assert ray_executor_v2.RayExecutorV2.uses_ray and ray_executor_v2.RayExecutorV2.supports_pp
    assert hasattr(vllm_envs, "VLLM_USE_RAY_V2_EXECUTOR_BACKEND")
    from vllm.config import ParallelConfig

    assert {"ray_runtime_env", "placement_group"} <= fields(ParallelConfig)
    assert isinstance(ParallelConfig.use_ray, property)


def test_distributed_contact():
    """What the worker uses of vLLM's distributed layer and multi-node mode."""
    from vllm.config import ParallelConfig
    from vllm.distributed import parallel_state
    from vllm.utils.network_utils import get_ip

    assert params(parallel_state.init_distributed_environment) >= {
        "world_size", "rank", "distributed_init_method", "local_rank", "backend"}
    assert params(parallel_state.ensure_model_parallel_initialized) >= {
        "tensor_model_parallel_size", "pipeline_model_parallel_size"}
    assert callable(parallel_state.get_world_group) and callable(get_ip)
    assert fields(ParallelConfig) >= {
        "tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size", "nnodes",
        "node_rank", "master_addr", "master_port", "distributed_executor_backend",
        "enable_expert_parallel", "disable_custom_all_reduce",
        "prefill_context_parallel_size", "decode_context_parallel_size"}
    assert isinstance(ParallelConfig.local_world_size, property)
    from vllm.entrypoints.cli.serve import run_headless  # the launcher's --headless hosts

    assert callable(run_headless)


def test_launcher_command_line():
    """The launcher runs `python -m vllm.entrypoints.cli.main serve ...` on every host
    with vLLM's multi-node options."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", "--help=all"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    for option in ("--nnodes", "--node-rank", "--master-addr", "--master-port", "--headless",
                   "--tensor-parallel-size", "--pipeline-parallel-size"):
        assert option in done.stdout, option


def test_option_and_request_contact():
    """What the option table, the request check, the hub loader and the logits
    processors use of vLLM."""
    from vllm.config import (AttentionConfig, CompilationConfig, KernelConfig, LoadConfig,
                             ModelConfig, VllmConfig)
    from vllm.engine.arg_utils import EngineArgs
    from vllm.exceptions import VLLMClientError, VLLMValidationError
    from vllm.platforms.interface import Platform
    from vllm.v1.sample.logits_processor import build_logitsprocs
    from vllm.v1.worker.gpu_input_batch import InputBatch

    for hook in ("apply_config_platform_defaults", "verify_quantization", "validate_request"):
        assert hasattr(Platform, hook), hook
    assert params(Platform.validate_request) >= {"processed_inputs", "params"}
    assert callable(EngineArgs.create_engine_config)
    assert fields(ModelConfig) >= {"logits_processors", "revision", "hf_token", "model",
                                   "enable_prompt_embeds", "hf_overrides", "convert"}
    assert fields(LoadConfig) >= {"download_dir", "load_format", "ignore_patterns"}
    assert fields(VllmConfig) >= {"optimization_level", "compilation_config", "kernel_config",
                                  "attention_config", "additional_config", "reasoning_config"}
    assert fields(CompilationConfig) >= {"mode", "cudagraph_mode", "cudagraph_capture_sizes"}
    assert fields(KernelConfig) >= {"ir_op_priority", "enable_jit_warmup"}
    assert fields(AttentionConfig) >= {"backend"}
    assert list(inspect.signature(build_logitsprocs).parameters)[4] == "custom_logitsprocs"
    assert "logitsprocs_need_output_token_ids" in params(InputBatch.__init__)
    assert issubclass(VLLMValidationError, VLLMClientError)  # the frontend answers 4xx


def test_engine_process_and_middleware_contact():
    """A worker that loses a peer ends its engine process, found by the title vLLM
    gives it; `vllm serve` takes the plugin's middleware as the default of its
    appending --middleware option."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser
    from vllm.utils.system_utils import set_process_title
    from vllm.v1.engine import core

    from vllm_metal.distributed.heartbeat import engine_process_title
    from vllm_metal.serving import MIDDLEWARE

    assert 'process_title = "EngineCore"' in inspect.getsource(core)
    assert "{prefix}::{name}" in inspect.getsource(set_process_title)
    assert engine_process_title() == "VLLM::EngineCore"
    parser = make_arg_parser(FlexibleArgumentParser())
    assert parser.parse_args(["--model", "m"]).middleware == MIDDLEWARE
    assert parser.parse_args(["--model", "m", "--middleware", "a.b"]).middleware == [
        *MIDDLEWARE, "a.b"]



def test_lora_contact():
    """vllm_metal.lora reads adapter configs with vLLM's PEFTHelper and each row's
    adapter from the input batch; the worker answers the engine's LoRA calls."""
    from vllm.lora.peft_helper import PEFTHelper
    from vllm.v1.worker.gpu_input_batch import InputBatch
    from vllm.v1.worker.worker_base import WorkerBase

    assert params(PEFTHelper.from_local_dir) >= {"lora_path", "max_position_embeddings"}
    assert params(PEFTHelper.validate_legal) >= {"lora_config"}
    assert params(PEFTHelper.get_rank_and_scaling) >= {"module_name"}
    init = inspect.getsource(InputBatch.__init__)
    assert "self.request_lora_mapping" in init and "self.lora_id_to_lora_request" in init
    for method in ("add_lora", "remove_lora", "list_loras", "pin_lora"):
        assert hasattr(WorkerBase, method), method


def test_latent_attention_and_model_hook_contact():
    """Latent attention's cache spec and vLLM's MLA switch; the capture size vLLM's
    gpt-oss hook sets (vllm_metal.options.VLLM_SET_CAPTURE_SIZE)."""
    import torch
    from vllm.config import ModelConfig
    from vllm.model_executor.models.config import GptOssForCausalLMConfig
    from vllm.v1.kv_cache_interface import MLAAttentionSpec

    from vllm_metal.options import VLLM_SET_CAPTURE_SIZE

    spec = MLAAttentionSpec(block_size=16, num_kv_heads=1, head_size=576, dtype=torch.bfloat16)
    assert spec.page_size_bytes == 16 * 576 * 2
    assert isinstance(ModelConfig.use_mla, property)
    hook = inspect.getsource(GptOssForCausalLMConfig.verify_and_update_config)
    assert f"max_cudagraph_capture_size = {VLLM_SET_CAPTURE_SIZE['GptOssForCausalLM']}" in hook


def test_mlx_lm_attention_contact():
    """attention/dispatch.py rebinds the name ``scaled_dot_product_attention`` that
    mlx-lm's model modules import from ``mlx_lm.models.base``, and keeps its
    signature; models/fusion.py relies on the projections' names and types."""
    import importlib

    import mlx.nn as nn
    from mlx_lm.models import base

    from vllm_metal.attention.dispatch import attention
    from vllm_metal.models.fusion import GROUPS

    assert list(inspect.signature(base.scaled_dot_product_attention).parameters) == [
        "queries", "keys", "values", "cache", "scale", "mask", "sinks"]
    assert list(inspect.signature(attention).parameters) == [
        "queries", "keys", "values", "cache", "scale", "mask", "sinks"]
    for name in ("llama", "qwen2", "qwen3", "gemma3_text", "phi3", "mixtral", "qwen3_moe",
                 "gpt_oss"):
        module = importlib.import_module(f"mlx_lm.models.{name}")
        assert module.scaled_dot_product_attention in (base.scaled_dot_product_attention,
                                                       attention), name
    attn = importlib.import_module("mlx_lm.models.qwen3").Attention
    mlp = importlib.import_module("mlx_lm.models.qwen3").MLP
    assert "q_proj" in inspect.getsource(attn.__call__)
    assert GROUPS == (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
    assert "self.gate_proj(x), self.up_proj(x)" in inspect.getsource(mlp.__call__)
    assert issubclass(nn.QuantizedLinear, nn.Module) and "mode" in inspect.signature(
        nn.QuantizedLinear.__init__).parameters


def test_engine_teardown_contact():
    """vLLM's engine teardown empties torch's accelerator caches off its CPU platform
    (``platform.quiet_teardown_without_torch_accelerator`` makes them no-ops where
    torch has no accelerator)."""
    import torch
    from vllm.distributed import parallel_state
    from vllm.v1.engine import core

    teardown = inspect.getsource(parallel_state.cleanup_dist_env_and_memory)
    assert "torch.accelerator.empty_cache()" in teardown
    assert "torch.accelerator.empty_host_cache()" in teardown
    assert "cleanup_dist_env_and_memory()" in inspect.getsource(core.EngineCore.shutdown)
    assert callable(torch.accelerator.empty_cache) and callable(torch.accelerator.empty_host_cache)
