"""A rank that stops answering: its process stopped (SIGSTOP) or its host's link
down, under TP=2 and PP=2 across two hosts (the launcher) and Ray TP=2. MLX's
collectives would wait forever; the heartbeat between ranks must end it: within
10 s the client's stream ends with an error, the server exits with a message that
names the silent rank and its address, and no process of the engine is left."""

import contextlib
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import requests

from conftest import requires_tool
from test_multihost import Launch, served_model
from vllm_metal.testing.netns import SimulatedHosts, can_simulate_hosts
from vllm_metal.testing.ray_nodes import (RayCluster, can_run_ray, ray_worker_processes,
                                         wait_for_no_ray_workers)
from vllm_metal.testing.server import Server

pytestmark = requires_tool(can_simulate_hosts())
LIMIT_S = 10  # the client's error
# Every host's processes gone: the peer timeout (3 s), rank 0's own shutdown, then the
# launcher's grace for the other hosts (2 s: a stopped rank ignores SIGTERM). About 6.5 s
# alone; 10.0 s once in CI beside another test worker.
EXIT_LIMIT_S = 15


def namespace_of(process: psutil.Process) -> str:
    return subprocess.run(["ip", "netns", "identify", str(process.pid)], capture_output=True,
                          text=True).stdout.strip()


def engine_workers(processes, hosts: SimulatedHosts, host: int) -> list[psutil.Process]:
    """The model-running processes (vLLM workers or Ray actors) on simulated host ``host``."""
    found = []
    for process in processes:
        with contextlib.suppress(psutil.Error):
            title = process.name() + " " + " ".join(process.cmdline())
            if ("Worker" in title or "MetalRayWorkerProc" in title) and \
                    namespace_of(process) == hosts.names[host]:
                found.append(process)
    return found


def silence(fault: str, hosts: SimulatedHosts, victims: list[psutil.Process]) -> None:
    if fault == "stop":
        for victim in victims:
            victim.send_signal(signal.SIGSTOP)
    else:  # the host's only link goes down
        subprocess.run(["ip", "-n", hosts.names[1], "link", "set", f"{hosts.prefix}a1", "down"],
                       check=True)


def stream_until_error(url: str, model: str):
    """A long streamed completion, under way; returns the line iterator."""
    response = requests.post(url + "/v1/completions", json={
        "model": model, "prompt": "hello", "max_tokens": 1000, "temperature": 0,
        "ignore_eos": True, "stream": True}, stream=True, timeout=(10, LIMIT_S + 5))
    lines = response.iter_lines()
    for _ in range(3):
        assert b"error" not in next(lines).lower()  # generation is under way
    return lines


def ended_with_error(lines) -> bool:
    try:
        for line in lines:
            if b"error" in line.lower():
                return True
    except requests.RequestException:
        return True
    return False


def check_silenced_rank_stops_everything(url, model, server_process, processes, hosts, fault,
                                         output) -> None:
    victims = engine_workers(processes(), hosts, 1)
    assert victims, [p.name() for p in processes()]
    lines = stream_until_error(url, model)
    everything = processes()
    silence(fault, hosts, victims)
    silenced_at = time.monotonic()
    errored = ended_with_error(lines)
    client_s = time.monotonic() - silenced_at
    server_process.wait(30)
    exit_s = time.monotonic() - silenced_at
    log = output()
    assert errored, log[-3000:]
    assert client_s < LIMIT_S, (client_s, log[-3000:])
    assert exit_s < EXIT_LIMIT_S, (exit_s, log[-3000:])
    assert f"lost contact with rank 1 ({hosts.addresses[1]})" in log, log[-3000:]
    if fault == "stop":
        for victim in victims:
            with contextlib.suppress(psutil.Error):
                victim.send_signal(signal.SIGCONT)  # a stopped process cannot die
    time.sleep(2)
    left = [p for p in everything if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not left, [(p.pid, p.name()) for p in left]


# CI runs one fault per layout (each fault and each layout at least once); the
# other pairs run with -m slow.
SLOW = pytest.mark.slow


@pytest.mark.parametrize("layout,fault", [
    (["--tensor-parallel-size", "2"], "stop"),
    (["--pipeline-parallel-size", "2"], "link"),
    pytest.param(["--tensor-parallel-size", "2"], "link", marks=SLOW),
    pytest.param(["--pipeline-parallel-size", "2"], "stop", marks=SLOW),
], ids=["tp2-stop", "pp2-link", "tp2-link", "pp2-stop"])
def test_launcher_silent_rank(tiny_model, tmp_path, layout, fault):
    model = tiny_model("qwen3")
    with SimulatedHosts(2) as hosts, Launch(hosts, model, layout, tmp_path) as launch:
        check_silenced_rank_stops_everything(
            launch.url, served_model(launch.url), launch.process, launch.processes, hosts,
            fault, launch.output)


@pytest.mark.parametrize("fault", ["stop", pytest.param("link", marks=SLOW)])
def test_ray_silent_rank(tiny_model, tmp_path, fault):
    if can_run_ray():
        pytest.fail(can_run_ray())
    model = tiny_model("qwen3")
    vllm = Path(sys.executable).with_name("vllm")
    wait_for_no_ray_workers()  # an earlier test's: every worker found below is this engine's
    with SimulatedHosts(2) as hosts, RayCluster(hosts, tmp_path, head=0, mlx=1) as cluster:
        cluster.add_node(1, mlx=1)
        server = Server([model, "--distributed-executor-backend", "ray",
                         "--tensor-parallel-size", "2", "--dtype", "float32",
                         "--max-model-len", "1024", "--kv-cache-memory-bytes", "64M"],
                        env=cluster.head_env(), log_path=tmp_path / "serve.log",
                        command=cluster.head_command([str(vllm), "serve"]),
                        host=hosts.addresses[0])
        with server:
            def processes():
                return psutil.Process(server.process.pid).children(recursive=True) + \
                    ray_worker_processes()

            check_silenced_rank_stops_everything(
                server.url, model, server.process, processes, hosts, fault,
                lambda: server.tail(10**7))
