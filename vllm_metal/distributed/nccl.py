"""MLX's NCCL backend (``VLLM_METAL_DISTRIBUTED_BACKEND=nccl``): tensor parallel
across the NVIDIA GPUs of MLX's CUDA build, one GPU per rank.

MLX's NCCL group starts from four settings per rank: its rank, the world size,
and rank 0's address and port for NCCL's rendezvous. They come from the ranks'
exchange over vLLM's control plane, as the ring's hostfile does. Each rank keeps
to one GPU: ``CUDA_VISIBLE_DEVICES`` is set from vLLM's local rank before MLX
first touches CUDA (``select_device``).
"""

import os

from vllm_metal import envs
from vllm_metal.distributed.parallel import Topology


def nccl_problems(tp_size: int, pp_size: int) -> list[str]:
    """Layouts and machines the NCCL backend cannot run, each with its fix."""
    problems = []
    if not cuda_available():
        problems.append(
            "VLLM_METAL_DISTRIBUTED_BACKEND=nccl on a machine where MLX has no CUDA GPU (NCCL "
            "needs MLX's CUDA build, `MLX_EXTRA=cuda13 ./install.sh`, and one NVIDIA GPU per "
            "rank): use the ring backend (unset the variable)"
        )
    if pp_size > 1:
        problems.append(
            f"--pipeline-parallel-size {pp_size} on nccl (stage-to-stage sends through MLX's "
            "NCCL group have not been verified on a multi-GPU machine): use tensor parallel "
            "alone on nccl, or the ring backend for pipeline parallel"
        )
    return problems


def cuda_available() -> bool:
    import mlx.core as mx

    cuda = getattr(mx, "cuda", None)
    return bool(cuda is not None and cuda.is_available())


def nccl_environment(everyone: list[dict], topology: Topology) -> dict[str, str]:
    """MLX's NCCL settings for this rank, from every rank's published info."""
    coordinator = everyone[0]
    return {
        "MLX_RANK": str(topology.rank),
        "MLX_WORLD_SIZE": str(topology.world_size),
        "NCCL_HOST_IP": coordinator["host"],
        "NCCL_PORT": str(coordinator["ring_port"]),
    }


def pin_gpu(local_rank: int) -> None:
    """One GPU per rank on this host; before MLX initialises CUDA in this process."""
    visible = os.environ.get(envs.VISIBLE_DEVICES)
    devices = visible.split(",") if visible else None
    os.environ["CUDA_VISIBLE_DEVICES"] = devices[local_rank] if devices else str(local_rank)
