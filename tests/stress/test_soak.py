"""64 streaming clients against `vllm serve` on the bundled model, as typed (no
flags): no failed request, every stream ends with [DONE], the engine's resident
memory flat after warm-up, and KV usage back to 0 at the end. CI runs 60 s; the
long variant (10 minutes) runs with ``-m slow``:

    .venv/bin/python -m pytest -m slow tests/stress/test_soak.py -s
"""

import json
import random
import statistics
import threading
import time
from pathlib import Path

import psutil
import pytest
import requests

from vllm_metal.testing.server import Server

MODEL = Path(__file__).resolve().parents[2] / "models" / "SmolLM2-135M-Instruct"
CLIENTS = 64
PROMPTS = ["Tell me about rivers.", "Write a haiku about snow.", "List three colors.",
           "What is 12 times 7?", "Describe a cat in one sentence.", "Name a planet."]


def engine_rss(server: Server) -> int:
    root = psutil.Process(server.process.pid)
    total = 0
    for process in [root, *root.children(recursive=True)]:
        try:
            total += process.memory_info().rss
        except psutil.Error:
            pass
    return total


def kv_usage(server: Server) -> float:
    text = requests.get(server.url + "/metrics", timeout=10).text
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith("vllm:kv_cache_usage_perc")]
    assert values, "no vllm:kv_cache_usage_perc metric"
    return max(values)


class Client(threading.Thread):
    def __init__(self, url: str, model: str, deadline: float, seed: int):
        super().__init__(daemon=True)
        self.url, self.model, self.deadline = url, model, deadline
        self.rng = random.Random(seed)
        self.done, self.failures = 0, []

    def run(self) -> None:
        while time.monotonic() < self.deadline:
            body = {"model": self.model, "stream": True,
                    "messages": [{"role": "user", "content": self.rng.choice(PROMPTS)}],
                    "max_tokens": self.rng.randint(8, 64),
                    "temperature": self.rng.choice([0, 0.7, 1.0])}
            try:
                with requests.post(self.url + "/v1/chat/completions", json=body, stream=True,
                                   timeout=120) as response:
                    if response.status_code != 200:
                        self.failures.append(f"HTTP {response.status_code}: {response.text[:200]}")
                        continue
                    lines = [line for line in response.iter_lines() if line]
                if lines[-1] != b"data: [DONE]":
                    self.failures.append(f"stream ended with {lines[-1][:200]!r}")
                elif errors := [line for line in lines if b'"error"' in line]:
                    self.failures.append(f"error event in stream: {errors[0][:300]!r}")
                else:
                    json.loads(lines[-2][6:])  # the last event is whole JSON
                    self.done += 1
            except (requests.RequestException, ValueError, IndexError) as error:
                self.failures.append(repr(error)[:200])


def soak(tmp_path, seconds: float) -> dict:
    server = Server([str(MODEL)], log_path=tmp_path / "serve.log")
    with server:
        model = requests.get(server.url + "/v1/models", timeout=10).json()["data"][0]["id"]
        start = time.monotonic()
        clients = [Client(server.url, model, start + seconds, seed) for seed in range(CLIENTS)]
        for client in clients:
            client.start()
        curve = []
        while any(c.is_alive() for c in clients):
            curve.append((round(time.monotonic() - start), engine_rss(server)))
            time.sleep(min(5.0, seconds / 12))
        for client in clients:
            client.join()
        time.sleep(1.0)
        usage_at_end = kv_usage(server)
    failures = [f for c in clients for f in c.failures]
    return {"completed": sum(c.done for c in clients), "failures": failures, "curve": curve,
            "kv_usage_at_end": usage_at_end}


def check(result: dict, record_property) -> None:
    record_property("soak", {k: v for k, v in result.items() if k != "failures"})
    print("rss curve (s, MB):", [(t, round(b / 1e6)) for t, b in result["curve"]])
    assert not result["failures"], result["failures"][:5]
    assert result["completed"] >= CLIENTS
    assert result["kv_usage_at_end"] == 0.0
    # Flat after warm-up: the last quarter's median within 10% of the second quarter's.
    rss = [b for _, b in result["curve"]]
    quarter = max(1, len(rss) // 4)
    warm = statistics.median(rss[quarter:2 * quarter])
    late = statistics.median(rss[-quarter:])
    assert late <= 1.10 * warm, [(t, round(b / 1e6)) for t, b in result["curve"]]


def test_soak_ci(tmp_path, record_property):
    check(soak(tmp_path, 60), record_property)


@pytest.mark.slow
def test_soak_ten_minutes(tmp_path, record_property):
    check(soak(tmp_path, 600), record_property)
