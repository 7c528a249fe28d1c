"""Start the MLX group from vLLM's control plane.

vLLM's workers already share a gloo group. Over it every rank publishes its
address, a free port for MLX's ring and a heartbeat port, its software
versions and the settings every rank must share; then each rank writes the same ring hostfile and joins the MLX group.
"""

import json
import logging
import os
import socket
import tempfile
from importlib.metadata import version

from vllm_metal import envs
from vllm_metal.distributed.heartbeat import serve_heartbeat
from vllm_metal.distributed.nccl import nccl_environment
from vllm_metal.distributed.parallel import DistributedError, ModelParallel, Topology, ring_order

logger = logging.getLogger("vllm.metal")

VERSIONED_PACKAGES = ("vllm", "mlx", "mlx-lm", "vllm-metal")


def software_versions() -> dict[str, str]:
    found = {}
    for name in VERSIONED_PACKAGES:
        try:
            found[name] = version(name)
        except Exception:
            found[name] = "missing"
    return found


def start_model_parallel(topology: Topology, host_ip: str, all_gather_object,
                         multi_host: bool = False) -> ModelParallel:
    import mlx.core as mx

    backend = envs.VLLM_METAL_DISTRIBUTED_BACKEND
    liveness_port = serve_heartbeat(host_ip)
    mine = {
        "rank": topology.rank,
        "host": host_ip,
        "ring_port": _free_port(host_ip),  # also NCCL's rendezvous port on rank 0
        "liveness_port": liveness_port,
        "pid": os.getpid(),
        "machine": _machine_id(),
        "versions": software_versions(),
        "settings": envs.rank_settings(),
    }
    everyone = sorted(all_gather_object(mine), key=lambda info: info["rank"])
    _check_versions(everyone)
    _check_settings(everyone)

    if backend == "ring":
        order = ring_order(topology.tp_size, topology.pp_size)
        hostfile = [[f"{everyone[r]['host']}:{everyone[r]['ring_port']}"] for r in order]
        path = os.path.join(tempfile.mkdtemp(prefix="vllm-metal-ring-"), "hosts.json")
        with open(path, "w") as f:
            json.dump(hostfile, f)
        os.environ["MLX_HOSTFILE"] = path
        os.environ["MLX_RANK"] = str(order.index(topology.rank))
    elif backend == "nccl":
        order = list(range(topology.world_size))
        os.environ.update(nccl_environment(everyone, topology))
    else:
        # jaccl reads its own settings (MLX_IBV_DEVICES, MLX_JACCL_COORDINATOR, set
        # by the launcher); MLX ranks are vLLM ranks.
        order = list(range(topology.world_size))
        os.environ.setdefault("MLX_RANK", str(topology.rank))
    try:
        group = mx.distributed.init(backend=backend, strict=True)
    except Exception as error:
        advice = {
            "ring": "Check that every host can reach the others' addresses (VLLM_HOST_IP) on "
                    "any TCP port.",
            "nccl": "Check that every rank has a GPU of its own (VLLM_METAL_VISIBLE_DEVICES) and "
                    "reaches rank 0's address; NCCL_DEBUG=INFO shows NCCL's view.",
            "jaccl": "Check RDMA (rdma_ctl enable; ibv_devices lists rdma_en*), the hostfile's "
                     "rdma entries and MLX_JACCL_COORDINATOR.",
        }[backend]
        raise DistributedError(
            f"rank {topology.rank} could not join the MLX {backend} group ({error}). {advice}"
        ) from error
    if group.size() != topology.world_size:
        raise DistributedError(
            f"the MLX {backend} group has {group.size()} ranks, vLLM expects "
            f"{topology.world_size} (tensor x pipeline parallel size)"
        )
    parallel = ModelParallel(
        topology,
        group,
        {rank: position for position, rank in enumerate(order)},
        {info["rank"]: (info["host"], info["liveness_port"])
         for info in everyone if info["rank"] != topology.rank},
        multi_host,
        ranks_on_host=sum(info["host"] == host_ip for info in everyone),
        local_pids={info["rank"]: info["pid"] for info in everyone
                    if info["rank"] != topology.rank and info["machine"] == mine["machine"]
                    and info["host"] == host_ip},
    )
    logger.info(
        "vllm-metal: rank %d joined the MLX %s group (TP rank %d of %d, PP stage %d of %d)",
        topology.rank, backend, topology.tp_rank, topology.tp_size,
        topology.pp_rank, topology.pp_size,
    )
    return parallel


def _check_versions(everyone: list[dict]) -> None:
    reference = everyone[0]
    for info in everyone[1:]:
        if info["versions"] != reference["versions"]:
            diff = ", ".join(
                f"{name} {reference['versions'][name]} on rank 0 ({reference['host']}) vs "
                f"{info['versions'].get(name)} on rank {info['rank']} ({info['host']})"
                for name in VERSIONED_PACKAGES
                if info["versions"].get(name) != reference["versions"][name]
            )
            raise DistributedError(
                f"version mismatch between hosts: {diff}. Install the same versions on "
                "every host (./install.sh pins them)."
            )


def _check_settings(everyone: list[dict]) -> None:
    reference = everyone[0]
    for info in everyone[1:]:
        for name, value in reference["settings"].items():
            theirs = info["settings"].get(name)
            if theirs != value:
                raise DistributedError(
                    f"{name} differs between ranks: {value} on rank 0 ({reference['host']}) "
                    f"vs {theirs} on rank {info['rank']} ({info['host']}). It shapes what "
                    "every rank runs: set it alike on every host, or unset it everywhere."
                )


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _machine_id() -> str:
    """Tells whether two ranks share a machine (and so a process table)."""
    return f"{socket.gethostname()}:{_boot_time()}"


def _boot_time() -> float:
    import psutil

    return psutil.boot_time()
