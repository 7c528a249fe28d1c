"""vLLM V1 worker: one process, one MLX device, one model runner."""

import logging
import time

import psutil
from vllm.v1.worker.worker_base import CompilationTimes, WorkerBase

from vllm_metal import envs
from vllm_metal.device import describe, select_device

logger = logging.getLogger("vllm.metal")

# Room kept free for activations and temporaries of a forward pass.
ACTIVATION_RESERVE_BYTES = 512 * 1024**2


class KVCacheMemoryError(RuntimeError):
    pass


class MetalWorker(WorkerBase):
    def init_device(self) -> None:
        envs.validate_all()
        device = select_device()
        logger.info("vllm-metal: Metal/MLX platform selected, running on %s (%s)", describe(), device)
        from vllm.utils.torch_utils import set_random_seed

        set_random_seed(self.model_config.seed)
        from vllm_metal.model_runner import MetalModelRunner

        self.model_runner = MetalModelRunner(self.vllm_config)

    def load_model(self, *, load_dummy_weights: bool = False) -> None:
        if load_dummy_weights:
            raise ValueError("vllm-metal cannot load dummy weights")
        self.model_runner.load_model()

    def get_model(self):
        return self.model_runner.model.model

    def get_model_inspection(self) -> str:
        return repr(self.model_runner.model.model)

    def get_kv_cache_spec(self):
        return self.model_runner.get_kv_cache_spec()

    def get_supported_kv_cache_layouts(self) -> list[str]:
        # Pools are per layer, blocks outermost: vLLM's identity layout.
        return ["LBHNC"]

    def determine_available_memory(self) -> int:
        explicit = self.cache_config.kv_cache_memory_bytes
        if explicit is not None:
            return int(explicit)
        return kv_cache_budget(
            weights=_weights_bytes(self.model_runner),
            block_bytes=self.model_runner.kv_bytes_per_block(),
        )

    def initialize_from_config(self, kv_cache_config) -> None:
        self.model_runner.initialize_kv_cache(kv_cache_config)

    def compile_or_warm_up_model(self) -> CompilationTimes:
        start = time.perf_counter()
        self.model_runner.warm_up()
        logger.info("Warm-up forward took %.2f s", time.perf_counter() - start)
        return CompilationTimes(language_model=0.0, encoder=0.0)

    def update_max_model_len(self, max_model_len: int) -> None:
        self.model_config.max_model_len = max_model_len
        self.model_runner.max_model_len = max_model_len

    def get_supported_tasks(self):
        return ("generate",)

    def execute_model(self, scheduler_output):
        return self.model_runner.execute_model(scheduler_output)

    def sample_tokens(self, grammar_output):
        return self.model_runner.sample_tokens(grammar_output)

    def take_draft_token_ids(self):
        return self.model_runner.take_draft_token_ids()

    def synchronize_device(self) -> None:
        import mlx.core as mx

        mx.synchronize()

    def reset_encoder_cache(self) -> None:
        return None

    def reset_mm_cache(self) -> None:
        return None

    def check_health(self) -> None:
        return None

    def sleep(self, level: int = 1) -> None:
        raise ValueError("vllm-metal does not support sleep mode")

    def wake_up(self, tags=None) -> None:
        raise ValueError("vllm-metal does not support sleep mode")

    def shutdown(self) -> None:
        self.model_runner = None


def _weights_bytes(runner) -> int:
    from vllm_metal.models.loader import weight_bytes

    return weight_bytes(runner.model.model)


def kv_cache_budget(weights: int, block_bytes: int) -> int:
    """Bytes for the KV cache: the configured share of the machine's memory,
    less the weights and a reserve for activations, and never more than is free now."""
    fraction = envs.VLLM_METAL_MEMORY_FRACTION
    memory = psutil.virtual_memory()
    budget = int(memory.total * fraction) - weights - ACTIVATION_RESERVE_BYTES
    free_now = memory.available - ACTIVATION_RESERVE_BYTES
    if budget > free_now:
        logger.warning(
            "VLLM_METAL_MEMORY_FRACTION=%.2f asks for %.1f GB of KV cache but only %.1f GB "
            "is free; using what is free",
            fraction, budget / 1e9, free_now / 1e9,
        )
        budget = free_now
    if budget < block_bytes:
        raise KVCacheMemoryError(
            f"No memory is left for the KV cache: {memory.total / 1e9:.1f} GB total, "
            f"VLLM_METAL_MEMORY_FRACTION={fraction} gives {memory.total * fraction / 1e9:.1f} GB, "
            f"weights take {weights / 1e9:.1f} GB. Raise VLLM_METAL_MEMORY_FRACTION, pass "
            "--kv-cache-memory-bytes, or use a smaller (or quantized) model."
        )
    return budget
