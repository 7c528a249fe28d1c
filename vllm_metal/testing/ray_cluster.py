"""A Ray cluster whose nodes are simulated hosts (network namespaces), started the
way users start theirs: ``ray start --head`` on the first, ``ray start --address``
on the others, each advertising ``mlx`` units.

    with SimulatedHosts(2) as hosts, RayCluster(hosts, mlx=[1, 1], root=tmp) as ray_nodes:
        ray_nodes.run_in_head([...])   # a command in the head's namespace, RAY_ADDRESS set
"""

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
    def __init__(self, hosts: SimulatedHosts, mlx: list[float | None], root: Path):
        self.hosts = hosts
        self.mlx = mlx  # per node: its mlx units, or None for a node without any
        # Ray's socket paths must stay short: a directory of its own under /tmp.
        self.root = Path(f"/tmp/rc{os.getpid() % 100000}")
        self.logs = root
        self.address = f"{hosts.addresses[0]}:{RAY_PORT}"

    def _start_node(self, index: int) -> None:
        name, address = self.hosts.names[index], self.hosts.addresses[index]
        command = ["ip", "netns", "exec", name, ray_command(), "start",
                   f"--node-ip-address={address}", "--num-cpus=1", "--disable-usage-stats",
                   f"--temp-dir={self.root}/n{index}"]
        if index == 0:
            command += ["--head", f"--port={RAY_PORT}", "--include-dashboard=false"]
        else:
            command += [f"--address={self.address}"]
        if self.mlx[index] is not None:
            command.append("--resources=" + json.dumps({"mlx": self.mlx[index]}))
        log = self.logs / f"ray-start-{index}.log"
        with open(log, "wb") as out:
            done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT,
                                  env=self.env(), timeout=120)
        if done.returncode:
            raise RuntimeError(f"ray start on {name} failed:\n{log.read_text()[-3000:]}")

    def env(self, **extra) -> dict:
        env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", **extra)
        return env

    def __enter__(self) -> "RayCluster":
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            for index in range(len(self.mlx)):
                self._start_node(index)
            self._wait_for_nodes()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _wait_for_nodes(self) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            status = self.run_in_head([ray_command(), "status"], capture=True)
            if status.stdout.count("node_") >= len(self.mlx):
                return
            time.sleep(1)
        raise RuntimeError(f"the Ray nodes did not all join:\n{status.stdout}{status.stderr}")

    def head_command(self, command: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.hosts.names[0], *command]

    def head_env(self, **extra) -> dict:
        return self.env(RAY_ADDRESS=self.address, **extra)

    def run_in_head(self, command: list[str], capture: bool = False, timeout: float = 300,
                    **env) -> subprocess.CompletedProcess:
        return subprocess.run(self.head_command(command), env=self.head_env(**env),
                              capture_output=capture, text=True, timeout=timeout)

    def processes(self) -> list:
        """This cluster's processes (``ray stop`` would stop every Ray on the machine)."""
        import psutil

        found = []
        for process in psutil.process_iter(["cmdline"]):
            if any(str(self.root) in part for part in process.info["cmdline"] or []):
                found.append(process)
        return found

    def __exit__(self, *exc) -> None:
        import psutil

        processes = self.processes()
        for process in processes:
            with _gone():
                process.terminate()
        _, alive = psutil.wait_procs(processes, timeout=10)
        for process in alive:
            with _gone():
                process.kill()
        psutil.wait_procs(alive, timeout=10)
        shutil.rmtree(self.root, ignore_errors=True)


class _gone:
    def __enter__(self):
        return self

    def __exit__(self, kind, *rest):
        import psutil

        return kind is not None and issubclass(kind, psutil.NoSuchProcess)
