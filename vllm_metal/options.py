"""Every vLLM engine option, classified: honoured, refused when set, or not applicable.

``OPTIONS`` names each field of vLLM's ``EngineArgs`` (the ``vllm serve`` flags and
the ``LLM(...)`` keywords). A refused option stops startup, with its ``--flag``
and the reason, when the engine configuration shows it set to anything but its
default. Not applicable: the option only acts together with a model kind or an
option that is refused already, so on its own it changes nothing, here as in
vLLM. ``tests/test_options.py`` fails when a vLLM upgrade adds an option that is
not in this table.
"""

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

HONOURED = "honoured"
REFUSED = "refused"
NOT_APPLICABLE = "not applicable"

_DEFAULT = object()


@dataclass(frozen=True)
class Option:
    status: str
    why: str
    # refused options: is the option set, given the VllmConfig and the option's default
    is_set: Callable[[Any, Any], bool] | None = None
    # checked before vLLM fills in its own defaults for the field (compilation, kernels)
    early: bool = False


def vllm(why: str = "vLLM's engine core, scheduler or frontend applies it") -> Option:
    return Option(HONOURED, why)


def plugin(why: str) -> Option:
    return Option(HONOURED, why)


def not_applicable(why: str) -> Option:
    return Option(NOT_APPLICABLE, why)


def refused(why: str, where: str | Callable, early: bool = False) -> Option:
    """``where``: the VllmConfig attribute path holding the value (set = differs from
    the option's default), or a ``check(vllm_config, default) -> bool``."""
    check = where if callable(where) else _differs_at(where)
    return Option(REFUSED, why, check, early)


def _value(vllm_config, path: str):
    value = vllm_config
    for part in path.split("."):
        value = getattr(value, part, None) if value is not None else None
    return value


def _differs_at(path: str) -> Callable:
    def check(vllm_config, default) -> bool:
        return _value(vllm_config, path) != default

    return check


def _true_at(path: str) -> Callable:
    return lambda vllm_config, default: bool(_value(vllm_config, path))


def _given_at(path: str) -> Callable:
    return lambda vllm_config, default: _value(vllm_config, path) is not None


def _above(path: str, limit) -> Callable:
    return lambda vllm_config, default: (_value(vllm_config, path) or 0) > limit


# ---- checks that need more than one comparison --------------------------------------

def _other_runner(vllm_config, default) -> bool:
    model = vllm_config.model_config
    return model is not None and model.runner_type != "generate"


def _converted(vllm_config, default) -> bool:
    model = vllm_config.model_config
    return model is not None and model.convert_type not in ("none",)


def _unreadable_load_format(vllm_config, default) -> bool:
    from vllm_metal.models.gguf import resolve_gguf_file

    load_format = vllm_config.load_config.load_format
    if load_format == "auto":
        return False
    is_gguf = vllm_config.model_config is not None and resolve_gguf_file(
        vllm_config.model_config.model) is not None
    return load_format != ("gguf" if is_gguf else "safetensors")


# vLLM's own per-architecture config hooks run before these checks and set a
# capture size where the user gave none: architecture -> that size.
VLLM_SET_CAPTURE_SIZE = {"GptOssForCausalLM": 1024}


def _capture_size_given(vllm_config, default) -> bool:
    size = vllm_config.compilation_config.max_cudagraph_capture_size
    if size is None:
        return False
    model = vllm_config.model_config
    arch = (model.architectures or [""])[0] if model is not None else ""
    return size != VLLM_SET_CAPTURE_SIZE.get(arch)


def _unsupported_executor(vllm_config, default) -> bool:
    backend = vllm_config.parallel_config.distributed_executor_backend
    return not (backend in (None, "uni", "mp", "ray") or isinstance(backend, type))


def _compilation_requested(vllm_config, default) -> bool:
    return bool(compilation_fields_set(vllm_config))


def compilation_fields_set(vllm_config) -> list[str]:
    """Fields of the compilation config the user set, other than what this platform
    runs anyway (no compilation, no CUDA graphs). Read before vLLM's defaults."""
    from vllm.config import CompilationConfig, CompilationMode
    from vllm.config.compilation import CUDAGraphMode

    allowed = {"mode": CompilationMode.NONE, "cudagraph_mode": CUDAGraphMode.NONE}
    covered = {"cudagraph_capture_sizes", "max_cudagraph_capture_size"}
    return _fields_set(vllm_config.compilation_config, CompilationConfig(), allowed, covered)


def _kernel_config_requested(vllm_config, default) -> bool:
    return bool(kernel_fields_set(vllm_config))


def kernel_fields_set(vllm_config) -> list[str]:
    from vllm.config import KernelConfig

    # enforce_eager switches JIT warm-up off on its own; there is no JIT here either way
    covered = {"ir_op_priority", "moe_backend", "linear_backend",
               "sparse_indexer_topk_backend", "enable_flashinfer_autotune", "enable_jit_warmup"}
    return _fields_set(vllm_config.kernel_config, KernelConfig(), {}, covered)


def _fields_set(config, defaults, allowed: dict, covered: set) -> list[str]:
    names = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name in covered or value == getattr(defaults, f.name):
            continue
        if f.name in allowed and value == allowed[f.name]:
            continue
        names.append(f.name)
    return names


def _attention_config_set(vllm_config, default) -> bool:
    from vllm.config import AttentionConfig

    return bool(_fields_set(vllm_config.attention_config, AttentionConfig(), {}, {"backend"}))


def _optimization_level(vllm_config, default) -> bool:
    # vLLM's default O2 cannot be told from an explicit -O2; O0 is what runs here
    return int(vllm_config.optimization_level) not in (0, int(default))


def _additional_config_set(vllm_config, default) -> bool:
    from_other_options = {"gdn_prefill_backend", "kda_prefill_backend", "kda_decode_backend"}
    return bool(set(vllm_config.additional_config or {}) - from_other_options)


def _reasoning_config_set(vllm_config, default) -> bool:
    """--reasoning-parser alone creates a reasoning config (its parser runs in the
    frontend); explicit start/end strings ask for the runner's thinking budget."""
    config = vllm_config.reasoning_config
    return config is not None and bool(config.reasoning_start_str or config.reasoning_end_str)


_MULTIMODAL = not_applicable("multimodal models are refused, and vLLM drops this option for "
                             "text-only models")


def _lora_dtype_other(vllm_config, default) -> bool:
    lora = vllm_config.lora_config
    model = vllm_config.model_config
    return lora is not None and lora.lora_dtype not in (
        None, "auto", model.dtype if model is not None else None)

_DATA_PARALLEL = not_applicable("data parallel only: --data-parallel-size above 1 is refused")
_EXPERT_PARALLEL = not_applicable("expert parallel only: --enable-expert-parallel is refused")
_CONTEXT_PARALLEL = not_applicable("context parallel only: context parallel sizes above 1 "
                                   "are refused")
_MAMBA = not_applicable("Mamba and hybrid models only; none of their architectures runs here")
_OFFLOAD = not_applicable("weight offloading only: --cpu-offload-gb and --offload-group-size "
                          "are refused")
_NO_KERNEL = "the model runs on MLX's kernels; vLLM's CUDA kernels are not used"
_LOADER = "the plugin reads the checkpoint itself with MLX"

OPTIONS: dict[str, Option] = {
    # ---- model and checkpoint
    "model": plugin("a local directory, GGUF file or Hugging Face hub id (huggingface_hub's "
                    "cache and download)"),
    "enable_return_routed_experts": refused(
        "the runner does not report MoE routing", "aux_output_config.enable_return_routed_experts"),
    "return_sampling_mask": refused("the runner does not return sampling masks",
                                    "model_config.return_sampling_mask"),
    "model_weights": refused(f"{_LOADER}: weights come from --model",
                             "model_config.model_weights"),
    "served_model_name": vllm(),
    "tokenizer": vllm(),
    "hf_config_path": refused(f"{_LOADER} and its config.json, so the shapes vLLM reads from "
                              "another config would not match the model",
                              "model_config.hf_config_path"),
    "runner": refused("only text generation is supported", _other_runner),
    "convert": refused("only text generation is supported (no pooling conversion)", _converted),
    "skip_tokenizer_init": vllm(),
    "enable_prompt_embeds": refused("the runner takes token ids only, not prompt embeddings",
                                    "model_config.enable_prompt_embeds"),
    "tokenizer_mode": vllm("tokenization runs in vLLM's frontend; the runner sees token ids"),
    "trust_remote_code": vllm("vLLM reads the config and tokenizer with it; the model itself "
                              "is mlx-lm's"),
    "allowed_local_media_path": _MULTIMODAL,
    "allowed_media_domains": _MULTIMODAL,
    "download_dir": plugin("hub downloads and cache lookups use it"),
    "safetensors_load_strategy": refused(_LOADER, "load_config.safetensors_load_strategy"),
    "safetensors_prefetch_num_threads": refused(
        _LOADER, "load_config.safetensors_prefetch_num_threads"),
    "safetensors_prefetch_block_size": refused(
        _LOADER, "load_config.safetensors_prefetch_block_size"),
    "load_format": refused(f"{_LOADER}: use auto, safetensors for a safetensors checkpoint "
                           "or gguf for a GGUF file", _unreadable_load_format),
    "config_format": refused(f"{_LOADER} from its config.json: use auto or hf",
                             lambda c, d: c.model_config.config_format not in ("auto", "hf")),
    "dtype": plugin("weights and KV cache are cast to it"),
    "kv_cache_dtype": refused("the KV cache uses the model dtype", "cache_config.cache_dtype"),
    "seed": plugin("seeds torch and MLX"),
    "max_model_len": vllm(),
    "revision": plugin("the hub snapshot of that revision is loaded"),
    "code_revision": vllm("remote config code is vLLM's; the model itself is mlx-lm's"),
    "hf_token": plugin("hub downloads use it"),
    "hf_overrides": refused(f"{_LOADER} and its config.json, so vLLM's overridden shapes and the "
                            "loaded model would disagree", _true_at("model_config.hf_overrides")),
    "model_class_overrides": refused("models are mlx-lm's, not vLLM's model classes",
                                     _true_at("model_config.model_class_overrides")),
    "tokenizer_revision": vllm(),
    "quantization": refused("the checkpoint's own format decides: MLX-quantized safetensors or "
                            "GGUF; leave the option out", _given_at("model_config.quantization")),
    "quantization_config": refused("the checkpoint's own format decides; there is no online "
                                   "quantization", _given_at("model_config.quantization_config")),
    "allow_deprecated_quantization": not_applicable("vLLM's quantization methods are refused"),
    "model_impl": refused("models are always mlx-lm's", "model_config.model_impl"),
    "model_loader_extra_config": refused(_LOADER,
                                         _true_at("load_config.model_loader_extra_config")),
    "ignore_patterns": refused(f"{_LOADER}: it reads the top-level model*.safetensors files",
                               "load_config.ignore_patterns"),
    "use_tqdm_on_load": plugin("the loader shows no progress bar either way"),
    "pt_load_map_location": refused(f"{_LOADER}; PyTorch .bin checkpoints are not read",
                                    "load_config.pt_load_map_location"),
    "max_parallel_loading_workers": refused(
        _LOADER, _given_at("parallel_config.max_parallel_loading_workers")),
    "generation_config": vllm(),
    "override_generation_config": vllm(),
    "logits_processors": plugin("built into the runner's input batch as vLLM's GPU runner does"),
    "language_model_only": _MULTIMODAL,
    "disable_sliding_window": refused("mlx-lm's models apply their sliding windows",
                                      _true_at("model_config.disable_sliding_window")),
    "pooler_config": not_applicable("pooling models are refused (--runner)"),
    "io_processor_plugin": not_applicable("pooling models are refused (--runner)"),

    # ---- sampling and outputs
    "max_logprobs": vllm(),
    "logprobs_mode": plugin("vLLM's sampler is built with it"),
    "use_fp64_gumbel": refused("the runner builds vLLM's sampler with float32 noise",
                               _true_at("model_config.use_fp64_gumbel")),
    "enable_trace_replay": refused("the runner does not replay traced tokens",
                                   _true_at("model_config.enable_trace_replay")),
    "structured_outputs_config": vllm("grammars run in vLLM; the runner applies the bitmask"),
    "aux_output_config": refused("the runner returns no auxiliary outputs",
                                 lambda c, d: c.aux_output_config != d),
    "reasoning_parser": vllm("reasoning is parsed in vLLM's frontend"),
    "reasoning_parser_plugin": vllm(),
    "reasoning_config": refused("the runner has no thinking budget (--reasoning-parser alone "
                                "works)", _reasoning_config_set),
    "watermark_config": refused("the runner does not watermark", _given_at("watermark_config")),
    "speculative_config": plugin("n-gram drafts; other methods are refused"),
    "spec_method": plugin("as --speculative-config: n-gram only"),
    "spec_model": plugin("as --speculative-config: n-gram only"),
    "spec_tokens": plugin("as --speculative-config: n-gram only"),
    "diffusion_config": refused("diffusion language models do not run here",
                                _given_at("diffusion_config")),

    # ---- parallelism and processes
    "distributed_executor_backend": refused(
        "uni, mp and ray run here (ray: one worker per `mlx` resource unit, see "
        "docs/distributed.md); external_launcher does not",
        _unsupported_executor),
    "pipeline_parallel_size": plugin("pipeline stages over mx.distributed"),
    "tensor_parallel_size": plugin("tensor shards over mx.distributed"),
    "master_addr": vllm("multi-node control plane"),
    "master_port": vllm("multi-node control plane"),
    "nnodes": vllm("multi-node control plane"),
    "node_rank": vllm("multi-node control plane"),
    "distributed_timeout_seconds": vllm("vLLM's gloo groups use it"),
    "cpu_distributed_timeout_seconds": vllm("vLLM's gloo groups use it"),
    "numa_bind": refused("vLLM binds NUMA nodes by GPU index",
                         _true_at("parallel_config.numa_bind")),
    "numa_bind_nodes": not_applicable("--numa-bind only, which is refused"),
    "numa_bind_cpus": not_applicable("--numa-bind only, which is refused"),
    "device_ids": refused("there is one MLX device per process (VLLM_MLX_DEVICE picks it)",
                          # early: the Ray executor sets the field itself, later
                          _given_at("parallel_config.assigned_physical_gpu_ids"),
                          early=True),
    "prefill_context_parallel_size": refused(
        "only tensor and pipeline parallel run here",
        _above("parallel_config.prefill_context_parallel_size", 1)),
    "decode_context_parallel_size": refused(
        "only tensor and pipeline parallel run here",
        _above("parallel_config.decode_context_parallel_size", 1)),
    "dcp_comm_backend": _CONTEXT_PARALLEL,
    "dcp_q_replicate": _CONTEXT_PARALLEL,
    "dcp_kv_cache_interleave_size": _CONTEXT_PARALLEL,
    "cp_kv_cache_interleave_size": _CONTEXT_PARALLEL,
    "data_parallel_size": refused("run one engine per machine",
                                  _above("parallel_config.data_parallel_size", 1)),
    "data_parallel_rank": _DATA_PARALLEL,
    "data_parallel_start_rank": _DATA_PARALLEL,
    "data_parallel_size_local": _DATA_PARALLEL,
    "data_parallel_address": _DATA_PARALLEL,
    "data_parallel_rpc_port": _DATA_PARALLEL,
    "data_parallel_hybrid_lb": _DATA_PARALLEL,
    "data_parallel_external_lb": _DATA_PARALLEL,
    "data_parallel_multi_port_external_lb": _DATA_PARALLEL,
    "data_parallel_backend": _DATA_PARALLEL,
    "dp_sync_interval": _DATA_PARALLEL,
    "disable_nccl_for_dp_synchronization": _DATA_PARALLEL,
    "enable_hc_sp": refused("only tensor and pipeline parallel run here",
                            _true_at("parallel_config.enable_hc_sp")),
    "enable_expert_parallel": refused("MoE experts are split by tensor parallelism",
                                      _true_at("parallel_config.enable_expert_parallel")),
    "enable_batch_sharded_sampling": refused(
        "rank 0 of the last stage samples the whole batch",
        _true_at("parallel_config.enable_batch_sharded_sampling")),
    "enable_ep_weight_filter": _EXPERT_PARALLEL,
    "all2all_backend": _EXPERT_PARALLEL,
    "enable_eplb": refused("MoE experts are split by tensor parallelism",
                           _true_at("parallel_config.enable_eplb")),
    "eplb_config": _EXPERT_PARALLEL,
    "expert_placement_strategy": _EXPERT_PARALLEL,
    "enable_elastic_ep": refused("MoE experts are split by tensor parallelism",
                                 _true_at("parallel_config.enable_elastic_ep")),
    "elastic_ep_max_dp_size": _EXPERT_PARALLEL,
    "enable_dbo": refused("the runner does not split batches into micro-batches",
                          _true_at("parallel_config.enable_dbo")),
    "ubatch_size": refused("the runner does not split batches into micro-batches",
                           _above("parallel_config.ubatch_size", 0)),
    "dbo_decode_token_threshold": not_applicable("--enable-dbo only, which is refused"),
    "dbo_prefill_token_threshold": not_applicable("--enable-dbo only, which is refused"),
    "_api_process_count": vllm("API server processes"),
    "_api_process_rank": vllm("API server processes"),
    "disable_custom_all_reduce": plugin("vLLM's custom all-reduce is never used here"),
    "enable_shm_tensor_arena": vllm("vLLM's executor broadcast"),
    "ray_workers_use_nsight": refused("nsight profiles CUDA kernels; MLX's are not",
                                      _true_at("parallel_config.ray_workers_use_nsight")),
    "worker_cls": vllm("a worker class given here replaces the plugin's"),
    "worker_extension_cls": vllm(),
    "enable_fault_tolerance": refused("the worker has no fault recovery",
                                      _true_at("parallel_config.enable_fault_tolerance")),
    "fault_tolerance_config": not_applicable("--enable-fault-tolerance only, which is refused"),

    # ---- memory and KV cache
    "block_size": plugin("the paged KV cache's block size (VLLM_METAL_BLOCK_SIZE when unset)"),
    "gpu_memory_utilization": plugin("the share of the device's memory (Metal: the GPU's "
                                     "recommended working set; CUDA: the GPU's; CPU: the "
                                     "machine's) for weights, KV cache and activations; "
                                     "VLLM_METAL_MEMORY_FRACTION is the same setting (both set "
                                     "to different values stops startup)"),
    "kv_cache_memory_bytes": plugin("the KV cache size (refused past the memory available now)"),
    "num_gpu_blocks_override": vllm("vLLM sizes the KV cache to it"),
    "enable_prefix_caching": vllm("vLLM's KV cache manager; the runner computes only the "
                                  "uncached tokens"),
    "prefix_caching_hash_algo": vllm(),
    "prefix_cache_retention_interval": vllm(),
    "prefix_match_unit": vllm(),
    "disable_cascade_attn": plugin("cascade attention is never used here"),
    "disable_hybrid_kv_cache_manager": vllm("the platform has no hybrid KV cache"),
    "kv_cache_dtype_skip_layers": not_applicable("--kv-cache-dtype only, which is refused"),
    "kv_sharing_fast_prefill": refused("the runner computes every layer's KV",
                                       _true_at("cache_config.kv_sharing_fast_prefill")),
    "swa_bounded_replay": not_applicable("DeepSeek-V4.1-style models only, which do not run "
                                         "here"),
    "kv_offloading_size": refused("there is no KV offloading",
                                  _given_at("cache_config.kv_offloading_size")),
    "kv_offloading_backend": not_applicable("--kv-offloading-size only, which is refused"),
    "kv_transfer_config": refused("KV connectors are not supported",
                                  _given_at("kv_transfer_config")),
    "kv_events_config": vllm("vLLM's KV cache manager publishes the events"),
    "ec_transfer_config": refused("encoder cache transfer is not supported",
                                  _given_at("ec_transfer_config")),
    "ec_manager_config": _MULTIMODAL,
    "offload_backend": refused("weights live in MLX memory; there is no offloading",
                               "offload_config.offload_backend"),
    "cpu_offload_gb": refused("weights live in MLX memory; there is no offloading",
                              _above("offload_config.uva.cpu_offload_gb", 0)),
    "offload_group_size": refused("weights live in MLX memory; there is no offloading",
                                  _above("offload_config.prefetch.offload_group_size", 0)),
    "cpu_offload_params": _OFFLOAD,
    "offload_num_in_group": _OFFLOAD,
    "offload_prefetch_step": _OFFLOAD,
    "offload_params": _OFFLOAD,
    "enable_sleep_mode": refused("the worker cannot sleep",
                                 _true_at("model_config.enable_sleep_mode")),
    "sleep_mode_offload_cudagraph": not_applicable("--enable-sleep-mode only, which is refused"),
    "sleep_preserve_parameter_names": not_applicable("--enable-sleep-mode only, which is "
                                                     "refused"),
    "enable_cumem_allocator": refused("MLX allocates its own memory",
                                      _true_at("model_config.enable_cumem_allocator")),
    "enable_nccl_comm_suspend": refused("there is no NCCL here",
                                        _true_at("model_config.enable_nccl_comm_suspend")),
    "weight_transfer_config": refused("weights cannot be updated in place",
                                      _given_at("weight_transfer_config")),

    # ---- scheduler
    "max_num_batched_tokens": vllm(),
    "max_num_scheduled_tokens": vllm(),
    "long_prefill_token_threshold": vllm(),
    "long_prefill_token_threshold_adaptive": vllm(),
    "max_num_seqs": vllm(),
    "max_num_active_seqs": vllm(),
    "max_num_queued_reqs": vllm(),
    "max_num_queued_tokens": vllm(),
    "enable_chunked_prefill": vllm("the runner runs prompt chunks"),
    "disable_chunked_mm_input": _MULTIMODAL,
    "scheduler_reserve_full_isl": vllm(),
    "prefill_schedule_interval": vllm(),
    "watermark": vllm(),
    "scheduling_policy": vllm(),
    "scheduler_cls": vllm(),
    "async_scheduling": plugin("the platform decides (see check_and_update_config)"),
    "stream_interval": vllm(),

    # ---- compilation and kernels: nothing is compiled, MLX runs eagerly
    "enforce_eager": plugin("decode steps run eagerly instead of as compiled MLX graphs"),
    "optimization_level": refused("nothing is compiled here: use -O0 or leave it out",
                                  _optimization_level),
    "performance_mode": refused("it tunes CUDA graphs and kernels, which are not used here",
                                "performance_mode"),
    "compilation_config": refused("nothing is compiled here and there are no CUDA graphs",
                                  _compilation_requested, early=True),
    "cudagraph_capture_sizes": refused(
        "there are no CUDA graphs",
        lambda c, d: bool(c.compilation_config.cudagraph_capture_sizes), early=True),
    "max_cudagraph_capture_size": refused(
        "there are no CUDA graphs", _capture_size_given, early=True),
    "ir_op_priority": refused(_NO_KERNEL, lambda c, d: c.kernel_config.ir_op_priority != d,
                              early=True),
    "kernel_config": refused(_NO_KERNEL, _kernel_config_requested, early=True),
    "enable_flashinfer_autotune": refused(
        _NO_KERNEL, _given_at("kernel_config.enable_flashinfer_autotune"), early=True),
    "moe_backend": refused(_NO_KERNEL, "kernel_config.moe_backend"),
    "linear_backend": refused(_NO_KERNEL, "kernel_config.linear_backend"),
    "sparse_indexer_topk_backend": refused(_NO_KERNEL, "kernel_config.sparse_indexer_topk_backend"),
    "attention_backend": refused(_NO_KERNEL, _given_at("attention_config.backend"), early=True),
    "attention_config": refused(_NO_KERNEL, _attention_config_set, early=True),
    "engram_config": refused("n-gram embedding models do not run here",
                             _given_at("engram_config")),
    "additional_config": refused("the plugin reads no platform-specific config",
                                 _additional_config_set),
    "gdn_prefill_backend": not_applicable("GDN models only, which do not run here"),
    "kda_prefill_backend": not_applicable("KDA models only, which do not run here"),
    "kda_decode_backend": not_applicable("KDA models only, which do not run here"),
    "mamba_config": _MAMBA,
    "mamba_cache_dtype": _MAMBA,
    "mamba_ssm_cache_dtype": _MAMBA,
    "mamba_block_size": _MAMBA,
    "mamba_cache_mode": _MAMBA,
    "enable_mamba_shared_prefix_checkpoint": _MAMBA,
    "replayssm_buffer_len": _MAMBA,
    "use_replayssm": _MAMBA,
    "mamba_backend": _MAMBA,
    "mamba_ssu_algorithm": _MAMBA,
    "enable_mamba_cache_stochastic_rounding": _MAMBA,
    "mamba_cache_philox_rounds": _MAMBA,

    # ---- LoRA
    "enable_lora": plugin("adapters applied in MLX to the attention and MLP projections "
                          "(vllm_metal/lora.py); one rank only"),
    "max_loras": plugin("adapter slots per batch"),
    "max_lora_rank": plugin("the largest rank an adapter may have; larger ones are refused "
                            "when they load"),
    "max_cpu_loras": plugin("adapters kept loaded; the least recently used unpinned one goes"),
    "lora_target_modules": plugin("only these projections take adapters"),
    "lora_dtype": refused("adapters run in the model's dtype", _lora_dtype_other),
    "fully_sharded_loras": not_applicable("tensor parallel only: LoRA with TP or PP is refused"),
    "default_mm_loras": _MULTIMODAL,
    "enable_tower_connector_lora": _MULTIMODAL,
    "specialize_active_lora": refused("it specializes CUDA graphs; there are none here",
                                      _true_at("lora_config.specialize_active_lora")),
    "enable_mixed_moe_lora_format": refused("MoE experts take no adapters here",
                                            _true_at("lora_config.enable_mixed_moe_lora_format")),
    "enable_moe_shared_loras": refused("MoE experts take no adapters here",
                                       _true_at("lora_config.enable_moe_shared_loras")),
    "max_lora_cls_labels": not_applicable("classification models only; pooling runners are "
                                          "refused"),

    # ---- multimodal
    "limit_mm_per_prompt": _MULTIMODAL,
    "enable_mm_embeds": _MULTIMODAL,
    "interleave_mm_strings": _MULTIMODAL,
    "media_io_kwargs": _MULTIMODAL,
    "mm_processor_kwargs": _MULTIMODAL,
    "mm_processor_cache_gb": _MULTIMODAL,
    "mm_processor_cache_type": _MULTIMODAL,
    "mm_hasher_algorithm": _MULTIMODAL,
    "mm_shm_cache_max_object_size_mb": _MULTIMODAL,
    "mm_encoder_only": _MULTIMODAL,
    "mm_encoder_tp_mode": _MULTIMODAL,
    "mm_encoder_attn_backend": _MULTIMODAL,
    "mm_encoder_attn_dtype": _MULTIMODAL,
    "mm_encoder_fp8_scale_path": _MULTIMODAL,
    "mm_encoder_fp8_scale_save_path": _MULTIMODAL,
    "mm_encoder_fp8_scale_save_margin": _MULTIMODAL,
    "skip_mm_profiling": _MULTIMODAL,
    "video_pruning_rate": _MULTIMODAL,
    "video_pruning_method": _MULTIMODAL,
    "mm_tensor_ipc": _MULTIMODAL,
    "mm_processor_device": _MULTIMODAL,
    "mm_ipc_gpu_memory_gb": _MULTIMODAL,
    "mm_device_do_normalize": _MULTIMODAL,
    "enable_mm_processor_stats": _MULTIMODAL,
    "renderer_num_workers": vllm("the frontend's renderer"),

    # ---- observability, logging, frontend
    "disable_log_stats": vllm(),
    "aggregate_engine_logging": vllm(),
    "show_hidden_metrics_for_version": vllm(),
    "otlp_traces_endpoint": vllm(),
    "collect_detailed_traces": refused("the runner records no per-step model timings",
                                       _given_at("observability_config.collect_detailed_traces")),
    "per_request_spec_decode_metrics": vllm(),
    "kv_cache_metrics": vllm(),
    "kv_cache_metrics_sample": vllm(),
    "custom_histogram_buckets": vllm(),
    "cudagraph_metrics": refused("there are no CUDA graphs",
                                 _true_at("observability_config.cudagraph_metrics")),
    "enable_layerwise_nvtx_tracing": refused(
        "there is no NVTX here", _true_at("observability_config.enable_layerwise_nvtx_tracing")),
    "enable_mfu_metrics": vllm("the scheduler's stats"),
    "enable_logging_iteration_details": vllm(),
    "jit_monitor_mode": not_applicable("there is no JIT compilation to monitor"),
    "jit_monitor_verbose": not_applicable("there is no JIT compilation to monitor"),
    "profiler_config": refused("the worker has no profiler hooks",
                               lambda c, d: c.profiler_config != d),
    "logging_config": vllm(),
    "log_level": vllm(),
    "log_config_file": vllm(),
    "shutdown_timeout": vllm(),
    "tokens_only": vllm(),
    "fail_on_environ_validation": vllm(),
}


def engine_arg_defaults() -> dict[str, Any]:
    from vllm.engine.arg_utils import EngineArgs

    defaults = {}
    for f in dataclasses.fields(EngineArgs):
        if f.default is not dataclasses.MISSING:
            defaults[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            defaults[f.name] = f.default_factory()
    return defaults


def flag(name: str) -> str:
    return "--" + name.lstrip("_").replace("_", "-")


def refused_options_set(vllm_config, early: bool) -> list[str]:
    """``--flag: why`` for each refused option the configuration has set."""
    defaults = engine_arg_defaults()
    problems = []
    for name, option in OPTIONS.items():
        if option.status != REFUSED or option.early != early:
            continue
        if option.is_set(vllm_config, defaults.get(name, _DEFAULT)):
            problems.append(f"{flag(name)} ({option.why})")
    return problems


def markdown_table() -> str:
    """docs/options.md: refused options first, then the rest (``python -m vllm_metal.options``)."""
    lines = [
        "# vLLM options on vllm-metal",
        "",
        "Generated from `vllm_metal/options.py` by `python -m vllm_metal.options > docs/options.md`;",
        "a test checks that this file matches the table. A refused option stops startup",
        "with its flag and the reason when it is set to anything but vLLM's default.",
        "Not applicable: the option acts only with a model kind or an option refused already.",
        "",
        "| option | status | why |",
        "| --- | --- | --- |",
    ]
    order = {REFUSED: 0, HONOURED: 1, NOT_APPLICABLE: 2}
    for name, option in sorted(OPTIONS.items(), key=lambda item: (order[item[1].status], item[0])):
        lines.append(f"| `{flag(name)}` | {option.status} | {option.why} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown_table(), end="")
