"""Tensor parallel across two hosts: Ray's executor against the plugin's launcher.

    python -m benchmarks.ray_tp [--model qwen3-0.6b|tiny-qwen3] [--tokens 32] [--rounds 3]

Two hosts simulated with network namespaces on this machine (root and iproute2
needed). In one run, bracketed A B A against the machine's drift:
A: ``python -m vllm_metal.launch`` over both hosts, ``vllm serve --tensor-parallel-size 2``;
B: a Ray cluster (``ray start`` on each host, one ``mlx`` unit each) and
   ``vllm serve --distributed-executor-backend ray --tensor-parallel-size 2`` on the head.
Each serves the same model; single-stream greedy decode over HTTP, tokens/s as (N - 1) /
(time of an N-token request - time of a 1-token one). Writes
``benchmarks/results/ray_tp.md`` and ``.json``.
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
COMMON = ["--dtype", "float32", "--max-model-len", "1024", "--seed", "0"]


def request_seconds(url: str, model: str, tokens: int) -> float:
    start = time.perf_counter()
    response = requests.post(url + "/v1/completions", timeout=600, json={
        "model": model, "prompt": "The history of the river begins", "max_tokens": tokens,
        "temperature": 0, "ignore_eos": True})
    response.raise_for_status()
    assert response.json()["usage"]["completion_tokens"] == tokens
    return time.perf_counter() - start


def decode_tokens_per_s(url: str, model: str, tokens: int) -> float:
    """Decode rate without the prompt's cost: a 1-token request's time taken off."""
    first = request_seconds(url, model, 1)
    return (tokens - 1) / (request_seconds(url, model, tokens) - first)


def launcher_speeds(hosts, model: str, tokens: int, rounds: int, tmp: Path) -> list[float]:
    import subprocess

    from vllm_metal.testing.server import free_port, wait_until_healthy

    port = free_port()
    hostfile = tmp / "hosts.json"
    hostfile.write_text(json.dumps(hosts.hostfile()))
    log_path = tmp / "launch.log"
    command = [sys.executable, "-m", "vllm_metal.launch", "--hostfile", str(hostfile),
               "--remote-exec", "ip netns exec {ssh}", "--master-port", str(free_port()),
               "--", model, "--port", str(port), "--tensor-parallel-size", "2", *COMMON]
    url = f"http://{hosts.addresses[0]}:{port}"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            wait_until_healthy(url, process, 600, lambda: log_path.read_text()[-3000:])
            decode_tokens_per_s(url, model, 4)  # first-call setup
            return [decode_tokens_per_s(url, model, tokens) for _ in range(rounds)]
        finally:
            _stop(process)


def ray_speeds(cluster, model: str, tokens: int, rounds: int, tmp: Path) -> list[float]:
    from vllm_metal.testing.server import Server

    vllm = Path(sys.executable).with_name("vllm")
    server = Server([model, "--distributed-executor-backend", "ray", "--tensor-parallel-size",
                     "2", *COMMON], env=cluster.head_env(), log_path=tmp / "ray-serve.log",
                    command=cluster.head_command([str(vllm), "serve"]),
                    host=cluster.hosts.addresses[cluster.head])
    with server:
        decode_tokens_per_s(server.url, model, 4)
        return [decode_tokens_per_s(server.url, model, tokens) for _ in range(rounds)]


def _stop(process) -> None:
    import os
    import signal
    import subprocess

    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


def report(model_name: str, runs: list[tuple[str, list[float]]], tokens: int) -> str:
    launcher = statistics.median([s for name, speeds in runs if name == "launcher"
                                  for s in speeds])
    ray = statistics.median([s for name, speeds in runs if name == "ray" for s in speeds])
    lines = [
        f"# Tensor parallel over two hosts: Ray vs the launcher ({model_name})",
        "",
        "Two network namespaces on one 2-core Linux VM, MLX CPU, float32, ring backend; "
        f"single-stream decode of {tokens} tokens over HTTP, A B A.",
        "",
        "| run | executor | decode tok/s (each round) | median |",
        "| --- | --- | --- | --- |",
    ]
    for index, (name, speeds) in enumerate(runs, 1):
        lines.append(f"| {index} | {name} | {', '.join(f'{s:.2f}' for s in speeds)} | "
                     f"{statistics.median(speeds):.2f} |")
    lines += ["", f"Ray / launcher (medians over all rounds): {ray / launcher:.2f}", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="qwen3-0.6b", choices=["qwen3-0.6b", "tiny-qwen3"])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=str(RESULTS / "ray_tp"))
    args = parser.parse_args(argv)
    from benchmarks.models import PREPARERS
    from vllm_metal.testing.netns import SimulatedHosts
    from vllm_metal.testing.ray_nodes import RayCluster

    model = str(PREPARERS[args.model]())
    runs = []
    with tempfile.TemporaryDirectory() as tmp_dir, SimulatedHosts(2) as hosts:
        tmp = Path(tmp_dir)
        runs.append(("launcher", launcher_speeds(hosts, model, args.tokens, args.rounds, tmp)))
        with RayCluster(hosts, tmp, head=0, mlx=1) as cluster:
            cluster.add_node(1, mlx=1)
            runs.append(("ray", ray_speeds(cluster, model, args.tokens, args.rounds, tmp)))
        runs.append(("launcher", launcher_speeds(hosts, model, args.tokens, args.rounds, tmp)))
    table = report(args.model, runs, args.tokens)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(table)
    out.with_suffix(".json").write_text(json.dumps({"model": args.model, "runs": runs}, indent=1))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
