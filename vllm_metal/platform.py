"""What vLLM sees: the MLX platform, its settings and the options it refuses."""

import logging
import os

import psutil
import torch
from vllm.platforms.interface import Platform, PlatformEnum

from vllm_metal import envs
from vllm_metal.device import describe, select_device

logger = logging.getLogger("vllm.metal")


class UnsupportedConfig(ValueError):
    pass


_CHECKED = "_vllm_metal_checked"


def _nothing_to_empty() -> None:
    return None


def quiet_teardown_without_torch_accelerator() -> None:
    """vLLM's engine teardown (``cleanup_dist_env_and_memory``) empties torch's
    accelerator caches on every platform but its own CPU one. Where torch has no
    accelerator (Linux without CUDA: MLX on the CPU) those calls raise, and every
    engine's exit ended in a traceback. There is no torch cache to empty there, so
    they do nothing; where torch has one (MPS on a Mac, CUDA) they stay as they are."""
    if torch.accelerator.is_available():
        return
    for name in ("empty_cache", "empty_host_cache"):
        if hasattr(torch.accelerator, name):
            setattr(torch.accelerator, name, _nothing_to_empty)


# Imported by every vLLM process that selects this platform, before any teardown.
quiet_teardown_without_torch_accelerator()


class MetalPlatform(Platform):
    _enum = PlatformEnum.OOT
    # torch device strings are built from this (vLLM's groups keep CPU tensors)
    device_name = "cpu"
    # vLLM's own bookkeeping (input batch, sampler) runs on CPU torch tensors;
    # the model itself runs in MLX.
    device_type = "cpu"
    dispatch_key = "CPU"
    ray_device_key = "mlx"
    device_control_env_var = envs.VISIBLE_DEVICES
    dist_backend = "gloo"
    supported_quantization = ["gguf"]

    @property
    def supported_dtypes(self) -> list[torch.dtype]:
        # vLLM casts float32 checkpoints to the first entry under --dtype auto.
        # MLX's CPU kernels are fastest in float32; its GPU kernels in half precision.
        import mlx.core as mx

        if select_device().type == mx.cpu:
            return [torch.float32, torch.bfloat16, torch.float16]
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_device_name(cls, device_id: int = 0) -> str:
        select_device()
        return describe()

    @classmethod
    def get_device_total_memory(cls, device_id: int = 0) -> int:
        return psutil.virtual_memory().total

    @classmethod
    def is_pin_memory_available(cls) -> bool:
        return False

    @classmethod
    def import_kernels(cls) -> None:
        # vLLM's compiled kernels are not used, and its x86 build assumes AVX-512.
        return None

    @classmethod
    def inference_mode(cls):
        return torch.no_grad()

    @classmethod
    def set_device(cls, device: torch.device) -> None:
        return None

    @classmethod
    def manual_seed_all(cls, seed: int) -> None:
        import mlx.core as mx

        torch.manual_seed(seed)
        mx.random.seed(seed)

    @classmethod
    def get_current_memory_usage(cls, device=None) -> float:
        import mlx.core as mx

        return float(mx.get_active_memory())

    @classmethod
    def check_and_update_config(cls, vllm_config) -> None:
        envs.validate_all()
        refuse_unsupported(vllm_config)
        from vllm_metal.attention import decode_kernel  # imports MLX: after the BLAS preload
        from vllm_metal.models import decode_block, gemv

        select_device()
        # Each refuses its kernel forced on (=1) off MLX's CUDA build.
        decode_kernel.available()
        decode_kernel.key_per_lane()
        decode_block.available()
        decode_kernel.writes_in_place()
        gemv.available()
        logger.info("vllm-metal: Metal/MLX platform selected (MLX device: %s)", describe())

        parallel = vllm_config.parallel_config
        if parallel.worker_cls == "auto":
            parallel.worker_cls = "vllm_metal.worker.MetalWorker"
        if parallel.distributed_executor_backend == "ray":
            from vllm_metal.distributed.ray_executor import MetalRayExecutor

            # A class, not its name: vLLM treats the engine as a Ray one by the
            # class's uses_ray.
            parallel.distributed_executor_backend = MetalRayExecutor
        elif parallel.world_size == 1:
            if parallel.distributed_executor_backend is None:
                parallel.distributed_executor_backend = "uni"
        elif parallel.distributed_executor_backend is None:
            # One worker process per rank; vLLM's control plane, MLX's collectives.
            parallel.distributed_executor_backend = "mp"
        parallel.disable_custom_all_reduce = True

        cache = vllm_config.cache_config
        if not cache.user_specified_block_size:
            cache.block_size = envs.VLLM_METAL_BLOCK_SIZE

        from vllm.config import CompilationMode
        from vllm.config.compilation import CUDAGraphMode

        compilation = vllm_config.compilation_config
        compilation.mode = CompilationMode.NONE
        compilation.cudagraph_mode = CUDAGraphMode.NONE
        compilation.cudagraph_capture_sizes = []
        _settle_async_scheduling(vllm_config)

        os.environ["VLLM_WORKER_MULTIPROC_METHOD"] = "spawn"
        setattr(vllm_config, _CHECKED, True)

    @classmethod
    def pre_register_and_update(cls, parser=None) -> None:
        if parser is not None:
            # `vllm serve`: the API key on every route, and the optional queue bound
            # (vllm_metal.serving); a user's --middleware entries are appended.
            from vllm_metal.serving import MIDDLEWARE

            parser.set_defaults(middleware=list(MIDDLEWARE))

    @classmethod
    def apply_config_platform_defaults(cls, vllm_config) -> None:
        # Runs before vLLM fills in its compilation and kernel defaults, so what is
        # set here is what the user asked for; not when the engine process re-runs
        # the checks on a configuration that has passed them (and holds those defaults).
        from vllm_metal.options import refused_options_set

        if not getattr(vllm_config, _CHECKED, False):
            _raise_for(refused_options_set(vllm_config, early=True))

    @classmethod
    def verify_quantization(cls, quant: str) -> None:
        raise UnsupportedConfig(
            f"vllm-metal (MLX platform) does not support: --quantization {quant} (from the "
            "option or the checkpoint's quantization_config). The plugin reads MLX-quantized "
            "safetensors and GGUF files by their own format: leave --quantization out, or set "
            "VLLM_METAL_USE_MLX=0 to use vLLM's own platform."
        )

    @classmethod
    def validate_request(cls, processed_inputs, params) -> None:
        from vllm_metal.requests import check_request

        check_request(processed_inputs, params)

    @classmethod
    def verify_model_arch(cls, model_arch: str) -> None:
        from vllm_metal.models.registry import check_architecture

        check_architecture(model_arch)

    @classmethod
    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None) -> str:
        raise UnsupportedConfig(
            "vllm-metal runs models in MLX and has no torch attention backend"
        )

    @classmethod
    def get_device_communicator_cls(cls) -> str:
        # vLLM's groups carry only its control plane; the model's collectives go
        # through mx.distributed.
        return "vllm.distributed.device_communicators.base_device_communicator.DeviceCommunicatorBase"

    @classmethod
    def support_hybrid_kv_cache(cls) -> bool:
        return False


def _settle_async_scheduling(vllm_config) -> None:
    """vLLM turns asynchronous scheduling on wherever it can. The runner overlaps
    steps in the in-process executor only: with several ranks each step's tokens
    are exchanged on the host, and vLLM's multiprocess executor reads a step's
    output on a thread of its own, where MLX must not be driven."""
    scheduler = vllm_config.scheduler_config
    backend = vllm_config.parallel_config.distributed_executor_backend
    if vllm_config.parallel_config.use_ray:
        backend = "ray"
    if scheduler.async_scheduling and backend != "uni":
        logger.info("vllm-metal: asynchronous scheduling runs with the in-process executor "
                    "(one rank) only; off with --distributed-executor-backend %s", backend)
        scheduler.async_scheduling = False


def refuse_unsupported(vllm_config) -> None:
    """Stop at startup for every option this platform would otherwise ignore
    (the table in vllm_metal.options), and for models it cannot run."""
    from vllm_metal.options import refused_options_set

    problems = refused_options_set(vllm_config, early=False)
    model = vllm_config.model_config
    parallel = vllm_config.parallel_config
    if model is not None:
        from vllm_metal.models.registry import (
            LATENT_ATTENTION,
            check_architecture,
            config_problems,
        )
        from vllm_metal.models.windows import window_problems

        for arch in model.architectures or []:
            check_architecture(arch)
            problems += window_problems(arch, model.hf_text_config)
            problems += config_problems(arch, model.hf_text_config)
            if arch in LATENT_ATTENTION and not model.use_mla:
                problems.append(
                    f"{arch} without latent attention (VLLM_MLA_DISABLE=1, or a non-causal "
                    "config): its model here always caches the latent; unset VLLM_MLA_DISABLE")
        if model.is_multimodal_model:
            problems.append("multimodal models (only text-only models are supported)")
        _check_weights_present(model.model)
    spec = vllm_config.speculative_config
    if spec is not None and spec.method != "ngram":
        problems.append(f"--speculative-config method {spec.method!r} (only 'ngram' is supported)")
    if parallel.world_size > 1:
        problems += parallel_problems(vllm_config)
    problems += worker_start_method_problems()
    problems += ray_problems(parallel)
    problems += in_place_write_problems(vllm_config)
    _raise_for(problems)


def in_place_write_problems(vllm_config) -> list[str]:
    """VLLM_METAL_KV_WRITE_IN_PLACE=1 acts on compiled decode steps only, which
    the engine runs with one rank, no LoRA and no --enforce-eager."""
    if envs.VLLM_METAL_KV_WRITE_IN_PLACE != "1":
        return []  # auto: in place wherever compiled decode steps run
    model = vllm_config.model_config
    off_by = [name for name, on in (
        ("--enforce-eager", model is not None and model.enforce_eager),
        ("--enable-lora", vllm_config.lora_config is not None),
        ("tensor or pipeline parallelism", vllm_config.parallel_config.world_size > 1),
    ) if on]
    if not off_by:
        return []
    return [f"VLLM_METAL_KV_WRITE_IN_PLACE=1 with {', '.join(off_by)} (it acts on compiled "
            "decode steps, which these turn off): unset VLLM_METAL_KV_WRITE_IN_PLACE"]


def ray_problems(parallel) -> list[str]:
    if parallel.distributed_executor_backend != "ray":
        return []
    from vllm_metal.distributed import ray_cluster

    return [problem for problem in (ray_cluster.ray_missing_message(),
                                    ray_cluster.legacy_executor_message()) if problem]


def _check_weights_present(model: str) -> None:
    """A local directory (an offline hub snapshot too) must hold weights, or the
    engine would fail only once its worker loads them."""
    from vllm_metal.models.hub import ModelNotFound, missing_weights_message

    missing = missing_weights_message(model, model)
    if missing:
        raise ModelNotFound(missing)


def _raise_for(problems: list[str]) -> None:
    if problems:
        raise UnsupportedConfig(
            "vllm-metal (MLX platform) does not support: "
            + "; ".join(problems)
            + ". Remove these options, or set VLLM_METAL_USE_MLX=0 to use vLLM's own platform."
        )


def worker_start_method_problems() -> list[str]:
    # Neither Metal nor a thread pool that torch or MLX already started
    # survives fork(): the engine process would hang on its first op.
    method = os.environ.get("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    if method == "spawn":
        return []
    return [f"VLLM_WORKER_MULTIPROC_METHOD={method} (MLX hangs in a forked process: "
            "unset it or use spawn)"]


def parallel_problems(vllm_config) -> list[str]:
    """Tensor/pipeline parallel layouts this platform cannot run, each with its fix."""
    from vllm_metal.distributed.parallel import ring_layout_problem

    model, parallel = vllm_config.model_config, vllm_config.parallel_config
    problems = []
    tp, pp = parallel.tensor_parallel_size, parallel.pipeline_parallel_size
    backend = parallel.distributed_executor_backend
    if vllm_config.lora_config is not None:
        problems.append("--enable-lora with tensor or pipeline parallel (adapters run on one "
                        "rank: leave out --tensor-parallel-size/--pipeline-parallel-size)")
    if backend == "uni":
        problems.append(
            "--distributed-executor-backend uni with more than one rank (leave the option "
            "out or use mp: one process per rank)"
        )
    if pp > 1 and vllm_config.speculative_config is not None:
        # Under PP, vLLM 0.32's batch queue schedules a request's drafts while its
        # previous step is still in flight, in the position of a token only the
        # last stage knows yet: the stages would run different inputs.
        problems.append(
            "--speculative-config with --pipeline-parallel-size above 1 (n-gram drafts work "
            "with tensor parallel; drop one of the two)"
        )
    backend_name = envs.VLLM_METAL_DISTRIBUTED_BACKEND
    if backend_name == "ring":
        layout = ring_layout_problem(tp, pp)
        if layout:
            problems.append(layout)
    elif backend_name == "nccl":
        from vllm_metal.distributed.nccl import nccl_problems

        problems += nccl_problems(tp, pp)
    elif tp > 1 and pp > 1:
        problems.append("tensor and pipeline parallel together on jaccl (MLX's jaccl groups "
                        "cannot be split): use TP alone or PP alone")
    if model is not None:
        text = model.hf_text_config
        heads = getattr(text, "num_attention_heads", 0)
        # Latent attention caches one latent for all heads, whole on every rank.
        kv_heads = heads if model.use_mla else model.get_total_num_kv_heads()
        if heads % tp or kv_heads % tp:
            problems.append(
                f"--tensor-parallel-size {tp}: the model has {heads} attention heads and "
                f"{kv_heads} KV heads, and both must divide by it (use a size that divides "
                f"{_gcd(heads, kv_heads)})"
            )
        layers = getattr(text, "num_hidden_layers", 0)
        if pp > layers:
            problems.append(
                f"--pipeline-parallel-size {pp}: the model has only {layers} layers"
            )
    return problems


def _gcd(a: int, b: int) -> int:
    import math

    return math.gcd(a, b)
