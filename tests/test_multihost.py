"""Several hosts simulated with network namespaces (own addresses, a bridge
between them), started by the launcher; the caller is the HTTP client. Served
tokens equal one host's, which equal transformers' float32."""

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import requests

from conftest import free_port, requires_tool, start_llm, stop_llm
from vllm_metal.testing.netns import SimulatedHosts, can_simulate_hosts
from vllm_metal.testing.reference import greedy_tokens, load_hf
from vllm_metal.testing.server import wait_until_healthy

pytestmark = requires_tool(can_simulate_hosts())

PROMPTS = ["def add_one(x):", "The quick brown fox jumps over the lazy dog. " * 4]
MAX_TOKENS = 12


def one_host_tokens(model: str) -> list[list[int]]:
    """One host's greedy tokens, checked against transformers float32 first."""
    from vllm import SamplingParams

    llm = start_llm(model)
    try:
        outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS,
                                                    ignore_eos=True))
    finally:
        stop_llm(llm)
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    hf = load_hf(model)
    assert tokens == [greedy_tokens(hf, list(o.prompt_token_ids), MAX_TOKENS) for o in outs]
    return tokens


class Launch:
    """`python -m vllm_metal.launch` over namespaces, its output in a log file."""

    def __init__(self, hosts: SimulatedHosts, model: str, serve_args: list[str], tmp_path,
                 env: dict | None = None):
        self.hosts = hosts
        self.port = free_port()
        hostfile = tmp_path / "hosts.json"
        hostfile.write_text(json.dumps(hosts.hostfile(envs=[f"{k}={v}" for k, v in
                                                            (env or {}).items()])))
        self.log_path = tmp_path / "launch.log"
        self.command = [
            sys.executable, "-m", "vllm_metal.launch", "--hostfile", str(hostfile),
            "--remote-exec", "ip netns exec {ssh}", "--master-port", str(free_port()),
            "--", model, "--port", str(self.port), "--kv-cache-memory-bytes", "64M",
            "--max-model-len", "1024", "--dtype", "float32", "--seed", "0", *serve_args,
        ]

    @property
    def url(self) -> str:
        return f"http://{self.hosts.addresses[0]}:{self.port}"

    def __enter__(self) -> "Launch":
        self.log = open(self.log_path, "wb")
        self.process = subprocess.Popen(self.command, stdout=self.log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        wait_until_healthy(self.url, self.process, 300, lambda: self.output()[-4000:])
        return self

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def processes(self) -> list[psutil.Process]:
        try:
            root = psutil.Process(self.process.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def __exit__(self, *exc) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
        self.log.close()


def completion_tokens(url: str, prompt: str, max_tokens: int = MAX_TOKENS) -> list[int]:
    response = requests.post(url + "/v1/completions", json={
        "model": None, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
        "ignore_eos": True, "return_token_ids": True,
    }, timeout=120)
    response.raise_for_status()
    return response.json()["choices"][0]["token_ids"]


def served_model(url: str) -> str:
    return requests.get(url + "/v1/models", timeout=10).json()["data"][0]["id"]


def test_two_hosts_tensor_parallel_serve_one_host_tokens(tiny_model, tmp_path):
    model = tiny_model("qwen3")
    expected = one_host_tokens(model)
    with SimulatedHosts(2) as hosts, Launch(hosts, model, ["--tensor-parallel-size", "2"],
                                            tmp_path) as launch:
        got = [completion_tokens(launch.url, p) for p in PROMPTS]
    assert got == expected


@pytest.mark.slow  # CI's time budget: PP across hosts is also in tests/stress (pp2-link)
def test_three_hosts_pipeline_parallel_serve_one_host_tokens(tiny_model, tmp_path):
    model = tiny_model("llama", num_hidden_layers=3)
    expected = one_host_tokens(model)
    with SimulatedHosts(3) as hosts, Launch(hosts, model, ["--pipeline-parallel-size", "3"],
                                            tmp_path) as launch:
        got = [completion_tokens(launch.url, p) for p in PROMPTS]
        assert "headless" in launch.output()
    assert got == expected


# Every host's processes gone after a rank is killed: rank 0 sees the dropped connection at
# once (the client's error: 0.1 s), then its own shutdown and the launcher's stop of the other
# hosts. 4-5 s alone; 15.5 s once in CI beside another test worker, whose load slows every
# process's teardown. The client's limit stays 10 s.
KILLED_RANK_EXIT_LIMIT_S = 20


def test_killing_a_rank_fails_requests_and_stops_every_host(tiny_model, tmp_path):
    model = tiny_model("qwen3")
    with SimulatedHosts(2) as hosts, Launch(hosts, model, ["--tensor-parallel-size", "2"],
                                            tmp_path) as launch:
        workers = [p for p in launch.processes() if "Worker" in " ".join(p.cmdline() or [])
                   or p.name().startswith("VLLM::Worker")]
        rank1 = [p for p in workers if "TP1" in p.name() or "TP1" in " ".join(p.cmdline())]
        assert rank1, [p.name() for p in workers]
        stream = requests.post(launch.url + "/v1/completions", json={
            "model": served_model(launch.url), "prompt": "hello", "max_tokens": 1000,
            "temperature": 0, "ignore_eos": True, "stream": True,
        }, stream=True, timeout=30)
        lines = stream.iter_lines()
        for _ in range(3):
            assert b"error" not in next(lines).lower()  # generation is under way
        all_processes = launch.processes()
        rank1[0].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        ended_with_error = False
        try:
            for line in lines:
                if b"error" in line.lower():
                    ended_with_error = True
                    break
        except requests.RequestException:
            ended_with_error = True
        client_seconds = time.monotonic() - killed_at
        launch.process.wait(30)
        exit_seconds = time.monotonic() - killed_at
        output = launch.output()
    assert ended_with_error, output[-3000:]
    assert client_seconds < 10, client_seconds
    assert exit_seconds < KILLED_RANK_EXIT_LIMIT_S, (exit_seconds, output[-3000:])
    assert "lost contact with rank 1" in output, output[-3000:]
    time.sleep(1)
    assert not [p for p in all_processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
