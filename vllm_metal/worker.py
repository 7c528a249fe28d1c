"""vLLM V1 worker: one process, one MLX device, one model runner.

With tensor or pipeline parallelism vLLM starts one worker per rank. Each joins
vLLM's gloo group (vLLM's control plane: scheduler output to every rank) and
then the MLX group that carries the model's own collectives."""

import contextlib
import logging
import os
import socket
import time

import psutil
from vllm.config import CacheConfig
from vllm.v1.worker.worker_base import CompilationTimes, WorkerBase

from vllm_metal import envs, memory
from vllm_metal.device import describe, keep_heap_between_steps, on_cuda, select_device

logger = logging.getLogger("vllm.metal")

class MetalWorker(WorkerBase):
    """vLLM's calls in; the model runner's MLX work out, on the engine's thread or,
    in a one-process engine, on a thread of its own (``mlx_thread``)."""

    mlx_thread = None
    _forward = None  # the submitted forward whose sampling comes next

    def init_device(self) -> None:
        envs.validate_all()
        if self._runner_on_own_thread():
            from vllm_metal.mlx_thread import MlxThread

            self.mlx_thread = MlxThread()
            logger.info("vllm-metal: the model runner works on a thread of its own "
                        "(VLLM_METAL_RUNNER_THREAD=0: on the engine's)")
        self._on_mlx(self._init_device)

    def _runner_on_own_thread(self) -> bool:
        parallel = self.parallel_config
        return (envs.VLLM_METAL_RUNNER_THREAD and parallel.world_size == 1
                and parallel.distributed_executor_backend == "uni")

    def _on_mlx(self, fn, *args, **kwargs):
        """``fn`` where this worker's MLX work runs."""
        if self.mlx_thread is None:
            return fn(*args, **kwargs)
        return self.mlx_thread.call(fn, *args, **kwargs)

    def _init_device(self) -> None:
        if self.parallel_config.world_size > 1 and envs.VLLM_METAL_DISTRIBUTED_BACKEND == "nccl":
            from vllm_metal.distributed.nccl import pin_gpu

            pin_gpu(self.local_rank)
        device = select_device()
        import mlx.core as mx

        if device.type == mx.cpu:
            keep_heap_between_steps()
        logger.info("vllm-metal: Metal/MLX platform selected, running on %s (%s)", describe(), device)
        from vllm.utils.torch_utils import set_random_seed

        set_random_seed(self.model_config.seed)
        self.model_parallel = None
        if self.parallel_config.world_size > 1:
            self.model_parallel = self._init_distributed()
        from vllm_metal.model_runner import MetalModelRunner

        self.model_runner = MetalModelRunner(self.vllm_config, self.model_parallel)
        self.model_runner.in_flight.mlx_thread = self.mlx_thread

    def _init_distributed(self):
        import torch
        from vllm.distributed.parallel_state import (
            ensure_model_parallel_initialized,
            get_world_group,
            init_distributed_environment,
        )
        from vllm.utils.network_utils import get_ip

        from vllm_metal.distributed.bootstrap import start_model_parallel
        from vllm_metal.distributed.parallel import Topology

        parallel = self.parallel_config
        multi_node = parallel.nnodes > 1
        if parallel.use_ray:
            from vllm_metal.distributed.ray_cluster import node_address

            # Ray's nodes are hosts of their own, whatever vLLM's nnodes says.
            host_ip = node_address()
            _use_interface_of(host_ip, replace=True)
        elif multi_node:
            host_ip = get_ip()
            _use_interface_of(host_ip)
        else:
            host_ip = "127.0.0.1"
        if multi_node and parallel.node_rank > 0:
            _wait_for_coordinator(self.rank, parallel.master_addr, parallel.master_port)
        init_distributed_environment(
            parallel.world_size, self.rank, self.distributed_init_method, self.local_rank,
            backend="gloo",
        )
        ensure_model_parallel_initialized(
            parallel.tensor_parallel_size, parallel.pipeline_parallel_size
        )
        cpu_group = get_world_group().cpu_group

        def all_gather_object(obj):
            gathered = [None] * parallel.world_size
            torch.distributed.all_gather_object(gathered, obj, group=cpu_group)
            return gathered

        topology = Topology(self.rank, parallel.tensor_parallel_size,
                            parallel.pipeline_parallel_size)
        return start_model_parallel(topology, host_ip, all_gather_object, multi_node)

    def load_model(self, *, load_dummy_weights: bool = False) -> None:
        if load_dummy_weights:
            raise ValueError("vllm-metal cannot load dummy weights")
        self._on_mlx(self.model_runner.load_model)

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
        return self._on_mlx(self._determine_available_memory)

    def _determine_available_memory(self) -> int:
        """Bytes for this rank's KV cache (vllm_metal.memory has the rule), decided
        before anything of it is allocated."""
        view = memory.read_memory_view()
        demand = self._memory_demand()
        explicit = self.cache_config.kv_cache_memory_bytes
        if explicit is not None:
            memory.check_explicit_size(view, demand, int(explicit))
            return int(explicit)
        fraction = memory.memory_fraction(self.cache_config.gpu_memory_utilization,
                                          CacheConfig.gpu_memory_utilization)
        budget = memory.kv_cache_budget(view, demand, fraction)
        logger.info("vllm-metal: KV cache budget %.2f GB, limited by %s",
                    budget.nbytes / 1e9, budget.limited_by)
        return budget.nbytes

    def _memory_demand(self) -> memory.Demand:
        block_size = self.cache_config.block_size
        return memory.Demand(
            weights=_weights_bytes(self.model_runner),
            block_bytes=self.model_runner.kv_bytes_per_block(),
            blocks_per_request=-(-self.model_config.max_model_len // block_size),
            max_num_seqs=self.scheduler_config.max_num_seqs,
            ranks_on_host=(self.model_parallel.ranks_on_host if self.model_parallel
                           else 1),
        )

    def initialize_from_config(self, kv_cache_config) -> None:
        self._on_mlx(self._initialize_from_config, kv_cache_config)

    def _initialize_from_config(self, kv_cache_config) -> None:
        resident = (_weights_bytes(self.model_runner) + memory.ACTIVATION_RESERVE_BYTES
                    + kv_cache_config.num_blocks * self.model_runner.kv_bytes_per_block())
        memory.keep_resident(memory.read_memory_view(), resident)
        self.model_runner.initialize_kv_cache(kv_cache_config)

    def compile_or_warm_up_model(self) -> CompilationTimes:
        start = time.perf_counter()
        self._on_mlx(self.model_runner.warm_up)
        logger.info("Warm-up (prompt forwards, then each decode batch bucket) took %.2f s%s",
                    time.perf_counter() - start,
                    "; its kernels compile once a machine (MLX keeps them in MLX_PTX_CACHE_DIR, "
                    "else the temporary directory): later startups load them" if on_cuda() else "")
        if self.model_parallel is not None:
            self.model_parallel.watch_peers(envs.VLLM_METAL_PEER_TIMEOUT)
        return CompilationTimes(language_model=0.0, encoder=0.0)

    def update_max_model_len(self, max_model_len: int) -> None:
        self.model_config.max_model_len = max_model_len
        self.model_runner.max_model_len = max_model_len

    def get_supported_tasks(self):
        return ("generate",)

    def execute_model(self, scheduler_output):
        if self.mlx_thread is not None and scheduler_output.total_num_scheduled_tokens > 0:
            # Returns at once; the output comes from sample_tokens' ThreadedOutput.
            self._forward = self.mlx_thread.submit(self.model_runner.execute_model,
                                                   scheduler_output)
            return None
        with self._stop_on_lost_rank():
            return self._on_mlx(self.model_runner.execute_model, scheduler_output)

    def sample_tokens(self, grammar_output):
        if self._forward is not None:
            from vllm_metal.async_output import ThreadedOutput

            forward, self._forward = self._forward, None
            sampled = self.mlx_thread.submit(self.model_runner.sample_tokens, grammar_output)
            return ThreadedOutput(forward, sampled)
        with self._stop_on_lost_rank():
            return self._on_mlx(self.model_runner.sample_tokens, grammar_output)

    @contextlib.contextmanager
    def _stop_on_lost_rank(self):
        """A failed step must stop the engine, never let the ranks drift apart: the
        rank whose output the engine reads reports the error; any other rank exits
        (vLLM would log and drop its error, and the rank would carry on out of step
        with its peers' collectives), which vLLM's worker monitor turns into an
        engine failure."""
        try:
            yield
        except Exception as error:
            if self.model_parallel is None or self.model_runner.reports_output:
                raise
            logger.exception("vllm-metal: rank %d stops: %s", self.rank, error)
            logging.shutdown()
            os._exit(1)

    def take_draft_token_ids(self):
        return self._on_mlx(self.model_runner.take_draft_token_ids)

    def synchronize_device(self) -> None:
        import mlx.core as mx

        self._on_mlx(mx.synchronize)

    def reset_encoder_cache(self) -> None:
        return None

    def reset_mm_cache(self) -> None:
        return None

    # ---- LoRA (vllm_metal.lora) --------------------------------------------
    def add_lora(self, lora_request) -> bool:
        return self._on_mlx(self._adapters().add, lora_request)

    def remove_lora(self, lora_id: int) -> bool:
        return self._on_mlx(self._adapters().remove, lora_id)

    def list_loras(self) -> set[int]:
        return self._adapters().ids()

    def pin_lora(self, lora_id: int) -> bool:
        return self._adapters().pin(lora_id)

    def _adapters(self):
        adapters = self.model_runner.rank_model.adapters
        if adapters is None:
            raise RuntimeError("LoRA adapters need --enable-lora")
        return adapters

    def check_health(self) -> None:
        return None

    def sleep(self, level: int = 1) -> None:
        raise ValueError("vllm-metal does not support sleep mode")

    def wake_up(self, tags=None) -> None:
        raise ValueError("vllm-metal does not support sleep mode")

    def shutdown(self) -> None:
        self.model_runner = None
        if self.mlx_thread is not None:
            self.mlx_thread.stop()


def _weights_bytes(runner) -> int:
    from vllm_metal.models.loader import weight_bytes

    return weight_bytes(runner.model.model)


def _use_interface_of(host_ip: str, replace: bool = False) -> None:
    """gloo binds the interface its hostname resolves to unless told otherwise;
    point it at the one that carries this host's address (``replace``: also over
    a setting that came from another host's environment)."""
    if "GLOO_SOCKET_IFNAME" in os.environ and not replace:
        return
    for name, addresses in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == host_ip for a in addresses):
            os.environ["GLOO_SOCKET_IFNAME"] = name
            return
    raise RuntimeError(
        f"VLLM_HOST_IP={host_ip} is not an address of this host "
        f"({', '.join(sorted(psutil.net_if_addrs()))}): set it to this host's address "
        "on the network the other hosts reach (the hostfile's ips entry)"
    )


def _wait_for_coordinator(rank: int, address: str, port: int) -> None:
    """Fail within VLLM_METAL_CONNECT_TIMEOUT, not torch's 10 minutes, when rank 0's
    coordinator cannot be reached."""
    deadline = time.monotonic() + envs.VLLM_METAL_CONNECT_TIMEOUT
    while True:
        try:
            with socket.create_connection((address, port), timeout=2.0):
                return
        except OSError as error:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"rank {rank} cannot reach the coordinator at {address}:{port} ({error}) "
                    f"within {envs.VLLM_METAL_CONNECT_TIMEOUT:.0f} s. Check that --master-addr "
                    "is rank 0's address as seen from this host, that rank 0 is running, and "
                    "that no firewall blocks the port (VLLM_METAL_CONNECT_TIMEOUT sets the wait)."
                ) from error
            time.sleep(0.5)
