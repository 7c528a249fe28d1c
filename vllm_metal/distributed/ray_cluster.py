"""The Ray cluster as this plugin needs it: reachable, one ``mlx`` unit per rank,
and every host known by the address Ray knows it by; each mistake a message
naming its fix. Importable without Ray (its absence is one of the mistakes)."""

import logging
import os
import socket

logger = logging.getLogger("vllm.metal")

RAY_EXTRA = "pip install 'vllm-metal[ray]'"
RESOURCE = "mlx"
START_HEAD = "ray start --head --resources='{\"mlx\": 1}'"
START_NODE = "ray start --address=HEAD_IP:6379 --resources='{\"mlx\": 1}'"
# Read when a worker process imports vLLM and this plugin, before vLLM hands
# the driver's environment over.
_PRE_IMPORT_PREFIXES = ("VLLM_METAL_", "VLLM_MLX_", "MLX_")
_NODE_SPECIFIC = {"MLX_RANK", "MLX_HOSTFILE"}


class RayClusterError(RuntimeError):
    pass


def ray_missing_message() -> str | None:
    try:
        import ray  # noqa: F401
    except ImportError as error:
        return (f"--distributed-executor-backend ray needs Ray, which is not installed "
                f"({error}): {RAY_EXTRA}")
    return None


def legacy_executor_message() -> str | None:
    from vllm import envs as vllm_envs

    if vllm_envs.VLLM_USE_RAY_V2_EXECUTOR_BACKEND:
        return None
    return ("VLLM_USE_RAY_V2_EXECUTOR_BACKEND=0 (vLLM's legacy Ray executor builds a CUDA "
            "compiled graph and bypasses this plugin's worker): unset it")


def connect(parallel_config) -> None:
    """Join the Ray cluster (or start one on this machine) and check that it has
    an ``mlx`` unit free for every rank."""
    import ray

    if not ray.is_initialized():
        _init_ray(parallel_config.ray_runtime_env)
    if parallel_config.placement_group or ray.util.get_current_placement_group():
        return  # vLLM checks a placement group it is given
    check_resources(parallel_config.world_size, ray.cluster_resources(),
                    ray.available_resources())


def _init_ray(runtime_env) -> None:
    import ray

    address = os.environ.get("RAY_ADDRESS")
    if address and address != "auto":
        _check_reachable(address)
    try:
        ray.init(address=address or "auto", runtime_env=runtime_env, log_to_driver=True)
        return
    except ConnectionError as error:
        if address:
            raise RayClusterError(
                f"RAY_ADDRESS={address}: no Ray cluster answers ({error}). Start one with "
                f"{START_HEAD}, or unset RAY_ADDRESS to let the engine start one here"
            ) from error
    logger.info("vllm-metal: no Ray cluster is running; starting one on this machine with "
                "its MLX device ({\"mlx\": 1}). For several Macs, run %s on the first and "
                "%s on the others.", START_HEAD, START_NODE)
    ray.init(resources={RESOURCE: 1}, runtime_env=runtime_env, include_dashboard=False)


def _check_reachable(address: str) -> None:
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=5.0):
            return
    except (OSError, ValueError) as error:
        raise RayClusterError(
            f"RAY_ADDRESS={address}: cannot reach the Ray head ({error}). Check the head's "
            f"address and port (`ray status` on the head prints them), or start it with "
            f"{START_HEAD}"
        ) from error


def check_resources(ranks: int, total: dict, available: dict) -> None:
    have, free = total.get(RESOURCE, 0), available.get(RESOURCE, 0)
    if have == 0:
        raise RayClusterError(
            f"no node of the Ray cluster advertises an '{RESOURCE}' resource, so no worker "
            f"can be placed. Start Ray on each Mac with it: {START_HEAD} on the first, "
            f"{START_NODE} on the others"
        )
    if have < ranks:
        raise RayClusterError(
            f"the Ray cluster has {have:g} '{RESOURCE}' units and tensor-parallel-size x "
            f"pipeline-parallel-size needs {ranks} (one per rank): add nodes with "
            f"{START_NODE}, or lower the parallel sizes"
        )
    if free < ranks:
        raise RayClusterError(
            f"{have - free:g} of the Ray cluster's {have:g} '{RESOURCE}' units are held by "
            f"other jobs and this engine needs {ranks}: stop them (`ray status` lists what "
            "holds them) or lower the parallel sizes"
        )


def node_address() -> str:
    """This worker's address: the one Ray knows its node by."""
    import ray

    address = ray.util.get_node_ip_address()
    configured = os.environ.get("VLLM_HOST_IP")
    if configured and configured != address:
        raise RayClusterError(
            f"VLLM_HOST_IP={configured} on this node, but Ray knows it as {address}: unset "
            f"VLLM_HOST_IP, or restart this node's Ray with --node-ip-address={configured}"
        )
    return address


def check_driver_address() -> None:
    """The engine's own host: vLLM and Ray must name it alike."""
    import ray

    node = next((n for n in ray.nodes() if n.get("NodeID") ==
                 ray.get_runtime_context().get_node_id()), None)
    configured = os.environ.get("VLLM_HOST_IP")
    if node and configured and configured != node["NodeManagerAddress"]:
        raise RayClusterError(
            f"VLLM_HOST_IP={configured}, but Ray knows this host as "
            f"{node['NodeManagerAddress']}: unset VLLM_HOST_IP, or start this host's Ray "
            f"node with --node-ip-address={configured}"
        )


def pre_import_env() -> dict[str, str]:
    return {key: value for key, value in os.environ.items()
            if key.startswith(_PRE_IMPORT_PREFIXES) and key not in _NODE_SPECIFIC}


