"""``--distributed-executor-backend ray`` on a real Ray cluster whose nodes are
simulated hosts (network namespaces), started with ``ray start`` as users do. The
driver runs on the head's host, as Ray requires. Tokens are compared with
transformers float32 (the in-process executor's parity reference) and across
layouts; every mistake a user can make ends in its message within its limit."""

import json
import subprocess
import sys
import threading
import time

import pytest
import requests

from conftest import requires_tool
from vllm_metal.testing.netns import SimulatedHosts, can_simulate_hosts
from vllm_metal.testing.ray_nodes import (RayCluster, can_run_ray, ray_worker_processes,
                                         wait_for_no_ray_workers)
from vllm_metal.testing.reference import greedy_tokens, load_hf
from vllm_metal.testing.server import Server

pytestmark = [requires_tool(can_simulate_hosts()), requires_tool(can_run_ray())]

ARCHS = ["llama", "qwen2", "qwen3", "mistral", "phi3", "gemma2", "gemma3_text", "mixtral",
         "qwen3_moe"]
# Errors from a misconfigured cluster must come within this many seconds (vLLM's
# own wait for a placement group is 30 minutes).
ERROR_LIMIT_S = 60


@pytest.fixture(scope="module")
def hosts():
    with SimulatedHosts(3) as simulated:
        yield simulated


@pytest.fixture(scope="module")
def cluster(hosts, tmp_path_factory):
    """A head with one ``mlx`` unit; the two-node tests add the second node."""
    with RayCluster(hosts, tmp_path_factory.mktemp("ray"), head=0, mlx=1) as running:
        yield running


def drive(cluster: RayCluster, models: list[str], *args: str, timeout: float = 600,
          **env) -> tuple[list[dict], str, float]:
    """Run the generating driver on the head's host: (results, output, seconds)."""
    command = cluster.head_command([sys.executable, "-m", "vllm_metal.testing.ray_driver",
                                    *args, *models])
    start = time.monotonic()
    done = subprocess.run(command, env=cluster.head_env(**env), capture_output=True,
                          text=True, timeout=timeout)
    output = done.stdout + done.stderr
    results = [json.loads(line.removeprefix("RESULT ")) for line in done.stdout.splitlines()
               if line.startswith("RESULT ")]
    return results, output, time.monotonic() - start


def reference_tokens(model: str, result: dict) -> list[list[int]]:
    hf = load_hf(model)
    return [greedy_tokens(hf, ids, len(tokens))
            for ids, tokens in zip(result["prompt_ids"], result["tokens"])]


def assert_fails_with(output: str, seconds: float, *messages: str) -> None:
    assert seconds < ERROR_LIMIT_S, f"took {seconds:.0f} s:\n{output[-3000:]}"
    assert not any(line.startswith("RESULT ") for line in output.splitlines())
    for message in messages:
        assert message in output, output[-5000:]


# ---- one node -----------------------------------------------------------------

def test_one_node_greedy_tokens_equal_the_reference_on_every_architecture(cluster, tiny_model):
    models = [tiny_model(arch) for arch in ARCHS]
    results, output, _ = drive(cluster, models)
    assert len(results) == len(models), output[-5000:]
    for model, result in zip(models, results):
        assert result["executor"] == "MetalRayExecutor"
        assert result["tokens"] == reference_tokens(model, result), model


# Over HTTP, CI serves three (dense, sliding windows with soft-capping, experts); the test
# above already checks every architecture's tokens through Ray. ``-m slow`` serves all.
HTTP_IN_CI = {"qwen3", "gemma2", "mixtral"}


@pytest.mark.parametrize("arch", [a if a in HTTP_IN_CI else pytest.param(a, marks=pytest.mark.slow)
                                  for a in ARCHS])
def test_one_node_serves_the_reference_tokens_over_http(cluster, tiny_model, tmp_path, arch):
    model = tiny_model(arch)
    server = Server([model, "--distributed-executor-backend", "ray", "--dtype", "float32",
                     "--max-model-len", "512", "--seed", "0"],
                    env=cluster.head_env(), log_path=tmp_path / "serve.log",
                    command=cluster.head_command([str(_vllm()), "serve"]),
                    host=cluster.hosts.addresses[cluster.head])
    prompt = "The quick brown fox jumps over the lazy dog."
    with server:
        response = requests.post(server.url + "/v1/completions", json={
            "model": model, "prompt": prompt, "max_tokens": 10, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True}, timeout=120)
        response.raise_for_status()
        choice = response.json()["choices"][0]
        assert "(MetalRayWorkerProc pid=" in server.tail(10**7)  # a Ray actor ran the model
    assert choice["token_ids"] == greedy_tokens(load_hf(model), choice["prompt_token_ids"], 10)


def test_more_ranks_than_mlx_units_fails_fast_naming_the_fix(cluster, tiny_model):
    _, output, seconds = drive(cluster, [tiny_model("llama")], "--tp", "2")
    assert_fails_with(output, seconds, "has 1 'mlx' units", "needs 2",
                      "ray start --address=HEAD_IP:6379 --resources='{\"mlx\": 1}'")


def test_engine_address_unlike_rays_fails_fast(cluster, tiny_model):
    _, output, seconds = drive(cluster, [tiny_model("llama")], VLLM_HOST_IP="10.254.254.254")
    assert_fails_with(output, seconds, "VLLM_HOST_IP=10.254.254.254",
                      f"Ray knows this host as {cluster.hosts.addresses[0]}")


# ---- two nodes ----------------------------------------------------------------

@pytest.fixture(scope="module")
def two_nodes(cluster):
    if len(cluster.nodes) < 2:
        cluster.add_node(1, mlx=1)
    return cluster


@pytest.mark.parametrize("layout", [("--tp", "2"), ("--pp", "2")], ids=["tp2", "pp2"])
def test_two_nodes_give_one_rank_tokens(two_nodes, tiny_model, layout):
    """Held to transformers float32, as one rank is on every architecture (above)."""
    models = [tiny_model("llama"), tiny_model("qwen3_moe")]
    spanning, output, _ = drive(two_nodes, models, *layout)
    assert len(spanning) == 2, output[-5000:]
    for model, split in zip(models, spanning):
        assert split["tokens"] == reference_tokens(model, split), model
        assert split["prefix_caching"] is True
    # A rank ran on the second host (Ray tags its actors' log lines with their node's address).
    assert f"ip={two_nodes.hosts.addresses[1]})" in output, output[-5000:]


def test_a_worker_that_dies_fails_clients_and_stops_the_server(two_nodes, tiny_model, tmp_path):
    model = tiny_model("llama")
    wait_for_no_ray_workers()  # an earlier test's, on this cluster: the two found below are ours
    server = Server([model, "--distributed-executor-backend", "ray", "--tensor-parallel-size",
                     "2", "--dtype", "float32", "--max-model-len", "512", "--seed", "0"],
                    env=two_nodes.head_env(), log_path=tmp_path / "serve.log",
                    command=two_nodes.head_command([str(_vllm()), "serve"]),
                    host=two_nodes.hosts.addresses[0])
    with server:
        failures, finished = [], []

        def client():
            try:
                response = requests.post(server.url + "/v1/completions", json={
                    "model": model, "prompt": "Count: one, two,", "max_tokens": 400,
                    "temperature": 0, "ignore_eos": True}, timeout=60)
                (finished if response.ok else failures).append(response.status_code)
            except requests.RequestException as error:
                failures.append(repr(error))

        clients = [threading.Thread(target=client) for _ in range(4)]
        for thread in clients:
            thread.start()
        time.sleep(2.0)
        workers = ray_worker_processes()
        assert len(workers) == 2, [w.cmdline() for w in workers]
        killed_at = time.monotonic()
        workers[-1].kill()
        server.process.wait(timeout=30)
        exited_after = time.monotonic() - killed_at
        for thread in clients:
            thread.join(timeout=30)
        assert exited_after < 10, server.tail()
        assert failures and not finished, (failures, finished)
        # Ray's report of the dead actor, or the other rank's, whichever comes first: its
        # link to the killed rank drops (both name the rank and stop the engine).
        log = server.tail(10**7)
        assert "died unexpectedly" in log or "lost contact with rank 1" in log, log[-3000:]


# ---- no cluster, or one without `mlx` ----------------------------------------------

def test_a_cluster_without_mlx_fails_fast_with_the_ray_start_line(hosts, tiny_model,
                                                                  tmp_path):
    with RayCluster(hosts, tmp_path, head=2, mlx=None) as bare:
        _, output, seconds = drive(bare, [tiny_model("llama")])
    assert_fails_with(output, seconds, "no node of the Ray cluster advertises an 'mlx'",
                      "ray start --head --resources='{\"mlx\": 1}'")


def drive_here(model: str, **env) -> tuple[str, float]:
    """The driver in this host's namespace, with no cluster: (output, seconds)."""
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "vllm_metal.testing.ray_driver", model],
                          capture_output=True, text=True, timeout=120, env=RayCluster.env(**env))
    return done.stdout + done.stderr, time.monotonic() - start


def test_an_unreachable_ray_address_fails_fast(tiny_model):
    assert_fails_with(*drive_here(tiny_model("llama"), RAY_ADDRESS="127.0.0.1:9"),
                      "RAY_ADDRESS=127.0.0.1:9: cannot reach the Ray head")


def test_without_ray_installed_the_message_names_the_extra(tiny_model, tmp_path):
    shadow = tmp_path / "ray"
    shadow.mkdir()
    (shadow / "__init__.py").write_text("raise ImportError('No module named ray')\n")
    assert_fails_with(*drive_here(tiny_model("llama"), PYTHONPATH=str(tmp_path)),
                      "needs Ray, which is not installed", "pip install 'vllm-metal[ray]'")


def test_vllms_legacy_ray_executor_is_refused(tiny_model):
    assert_fails_with(*drive_here(tiny_model("llama"), VLLM_USE_RAY_V2_EXECUTOR_BACKEND="0"),
                      "VLLM_USE_RAY_V2_EXECUTOR_BACKEND=0", "unset it")


def _vllm():
    from pathlib import Path

    return Path(sys.executable).with_name("vllm")
