"""A Ray cluster whose nodes are simulated hosts (network namespaces), started the
way users start theirs: ``ray start --head`` on one host, ``ray start --address``
on the others, each advertising its ``mlx`` units.

    with SimulatedHosts(2) as hosts, RayCluster(hosts, tmp_path, head=0, mlx=1) as cluster:
        cluster.add_node(1, mlx=1)
        cluster.head_command([...])   # a command for the head's namespace
        cluster.head_env()            # the environment for it (RAY_ADDRESS set)
"""

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from vllm_metal.testing.netns import SimulatedHosts

RAY_PORT = 6379


def ray_command() -> str:
    return str(Path(sys.executable).with_name("ray"))


def can_run_ray() -> str | None:
    try:
        import ray  # noqa: F401
    except ImportError:
        return "ray is not installed (pip install 'vllm-metal[ray]')"
    return None


class RayCluster:
    def __init__(self, hosts: SimulatedHosts, logs: Path, head: int = 0,
                 mlx: float | None = 1):
        self.hosts = hosts
        self.logs = logs
        self.head = head
        self.head_mlx = mlx
        self.nodes: list[int] = []
        # Ray's socket paths must stay short: a directory of its own under /tmp.
        self.root = Path(f"/tmp/rc{os.getpid() % 100000}h{head}")
        self.address = f"{hosts.addresses[head]}:{RAY_PORT}"

    def __enter__(self) -> "RayCluster":
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            self.add_node(self.head, self.head_mlx)
        except BaseException:
            self.__exit__()
            raise
        return self

    def add_node(self, index: int, mlx: float | None = 1, env: dict | None = None) -> None:
        """``ray start`` on host ``index`` (the head first), waiting until it joined."""
        name, address = self.hosts.names[index], self.hosts.addresses[index]
        command = ["ip", "netns", "exec", name, ray_command(), "start",
                   f"--node-ip-address={address}", "--num-cpus=1", "--disable-usage-stats",
                   f"--temp-dir={self.root}/n{index}"]
        if index == self.head:
            command += ["--head", f"--port={RAY_PORT}", "--include-dashboard=false"]
        else:
            command += [f"--address={self.address}"]
        if mlx is not None:
            command.append("--resources=" + json.dumps({"mlx": mlx}))
        log = self.logs / f"ray-start-{name}.log"
        with open(log, "wb") as out:
            done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT,
                                  env=self.env(**(env or {})), timeout=120)
        if done.returncode:
            raise RuntimeError(f"ray start on {name} failed:\n{log.read_text()[-3000:]}")
        self.nodes.append(index)
        self._wait_for_nodes(len(self.nodes))

    def _wait_for_nodes(self, count: int) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            status = subprocess.run(self.head_command([ray_command(), "status"]),
                                    env=self.head_env(), capture_output=True, text=True,
                                    timeout=60)
            if status.stdout.count(" node_") >= count:
                return
            time.sleep(1)
        raise RuntimeError(f"the Ray nodes did not all join:\n{status.stdout}{status.stderr}")

    @staticmethod
    def env(**extra) -> dict:
        return dict(os.environ, RAY_USAGE_STATS_ENABLED="0", **extra)

    def head_command(self, command: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.hosts.names[self.head], *command]

    def head_env(self, **extra) -> dict:
        return self.env(RAY_ADDRESS=self.address, **extra)

    def processes(self) -> list:
        """This cluster's processes (``ray stop`` would stop every Ray on the machine)."""
        import psutil

        found = []
        for process in psutil.process_iter(["cmdline"]):
            with contextlib.suppress(psutil.Error):
                if any(str(self.root) in part for part in process.info["cmdline"] or []):
                    found.append(process)
        return found

    def __exit__(self, *exc) -> None:
        import psutil

        processes = self.processes()
        for process in processes:
            with contextlib.suppress(psutil.Error):
                process.terminate()
        _, alive = psutil.wait_procs(processes, timeout=10)
        for process in alive:
            with contextlib.suppress(psutil.Error):
                process.kill()
        psutil.wait_procs(alive, timeout=10)
        shutil.rmtree(self.root, ignore_errors=True)


def wait_for_no_ray_workers(timeout: float = 60.0) -> None:
    """Until the worker actors of earlier engines are gone: Ray ends an engine's
    actors after its driver exits, in its own time (longer on a busy machine)."""
    deadline = time.monotonic() + timeout
    while ray_worker_processes():
        if time.monotonic() > deadline:
            raise TimeoutError(f"Ray worker actors of an earlier engine still run after "
                               f"{timeout} s: {[p.pid for p in ray_worker_processes()]}")
        time.sleep(0.5)


def ray_worker_processes() -> list:
    """The plugin's Ray worker actors running on this machine (any simulated host)."""
    import psutil

    found = []
    for process in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if any("MetalRayWorkerProc" in part for part in process.info["cmdline"] or []):
                found.append(process)
    return found
