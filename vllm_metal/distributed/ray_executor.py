"""``--distributed-executor-backend ray``: vLLM's Ray executor (V2) on MLX devices.

Each Mac runs ``ray start ... --resources='{"mlx": 1}'``; the engine places one
worker per ``mlx`` unit and the workers talk as under vLLM's multiprocess executor
(its message queues for the control plane, mx.distributed for the model).

Everything this plugin asks of vLLM's Ray executor is here (pinned by
tests/test_vllm_contact.py):

- Ray lists accelerator ids only for the kinds it knows (GPU, TPU, ...), so
  vLLM's lookup of the ``mlx`` ids fails; the worker class answers it itself.
- vLLM waits 30 minutes for a placement group the cluster cannot give; the
  cluster's ``mlx`` units are checked first (ray_cluster), and the wait is bounded.
- Settings read before a worker imports vLLM go into the actors' runtime env.
"""

import contextlib

from vllm.v1.executor import ray_executor_v2, ray_utils
from vllm.v1.executor.ray_executor_v2 import RayExecutorV2, RayWorkerProc

from vllm_metal.distributed.ray_cluster import check_driver_address, connect, pre_import_env

# A placement group that the checked resources allow forms within seconds.
PLACEMENT_WAIT_S = 60


@contextlib.contextmanager
def _bounded_placement_wait():
    saved = ray_utils.PG_WAIT_TIMEOUT
    ray_utils.PG_WAIT_TIMEOUT = PLACEMENT_WAIT_S
    try:
        yield
    finally:
        ray_utils.PG_WAIT_TIMEOUT = saved


@contextlib.contextmanager
def _metal_worker_class(worker_cls):
    saved = ray_executor_v2.RayWorkerProc
    ray_executor_v2.RayWorkerProc = worker_cls
    try:
        yield
    finally:
        ray_executor_v2.RayWorkerProc = saved


class MetalRayWorkerProc(RayWorkerProc):
    def get_node_and_physical_gpu_ids(self) -> tuple[str, list[int]]:
        import ray

        # One MLX device per host; Ray keeps no ids for a custom resource.
        return ray.get_runtime_context().get_node_id(), [0]


class MetalRayExecutor(RayExecutorV2):
    uses_ray = True
    supports_pp = True

    def _init_executor(self) -> None:
        connect(self.parallel_config)
        check_driver_address()
        with _bounded_placement_wait(), _metal_worker_class(MetalRayWorkerProc):
            super()._init_executor()

    def _build_runtime_env(self) -> dict:
        runtime_env = super()._build_runtime_env()
        runtime_env.setdefault("env_vars", {}).update(pre_import_env())
        return runtime_env
