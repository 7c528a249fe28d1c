"""Resident memory of a serving engine over a long run (not part of CI).

    .venv/bin/python -m benchmarks.memory_soak --minutes 10

Serves the bundled model with no memory flag, as the README does, keeps
``--concurrency`` clients sending completions of mixed lengths to 127.0.0.1, and
samples the RSS of every process of the server (API server, engine core, any
workers) and the machine's available memory every ``--every`` seconds. Prints a
markdown table and the growth of each process's RSS from the first sample after
warm-up to the last.
"""

import argparse
import random
import threading
import time
from pathlib import Path

import psutil
import requests

from vllm_metal.testing.server import Server

ROOT = Path(__file__).resolve().parent.parent
MODEL = "models/SmolLM2-135M-Instruct"
WORDS = "the river runs past old town walls where people meet to trade news and bread".split()


def client_loop(url: str, model: str, stop: threading.Event, seed: int, counts: list) -> None:
    rng = random.Random(seed)
    while not stop.is_set():
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 400)))
        try:
            r = requests.post(url + "/v1/completions", timeout=120, json={
                "model": model, "prompt": prompt, "max_tokens": rng.randint(8, 128),
                "temperature": 0.7, "ignore_eos": True})
            counts[0 if r.status_code == 200 else 1] += 1
        except requests.RequestException:
            counts[1] += 1


def rss_by_process(root: psutil.Process) -> dict[str, int]:
    rss = {}
    for p in [root, *root.children(recursive=True)]:
        try:
            rss[f"{p.name()}[{p.pid}]"] = p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return rss


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--every", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()

    server = Server([str(ROOT / MODEL), "--served-model-name", "soak"], cwd=ROOT,
                    log_path=Path("/tmp") / "memory_soak_server.log")
    server.start(timeout=400)
    stop, counts = threading.Event(), [0, 0]
    clients = [threading.Thread(target=client_loop, args=(server.url, "soak", stop, i, counts),
                                daemon=True) for i in range(args.concurrency)]
    samples = []
    try:
        root = psutil.Process(server.process.pid)
        for c in clients:
            c.start()
        start = time.monotonic()
        while time.monotonic() - start < args.minutes * 60:
            samples.append((time.monotonic() - start, rss_by_process(root),
                            psutil.virtual_memory().available, counts[0], counts[1]))
            time.sleep(args.every)
    finally:
        stop.set()
        for c in clients:
            c.join(timeout=130)
        server.stop()
    report(samples)


def report(samples) -> None:
    names = sorted({n for _, rss, *_ in samples for n in rss})
    print("| s | " + " | ".join(f"{n} MB" for n in names) + " | available GB | done | failed |")
    print("|" + " --- |" * (len(names) + 4))
    for t, rss, available, done, failed in samples:
        cells = [f"{rss[n] / 1e6:.0f}" if n in rss else "-" for n in names]
        print(f"| {t:.0f} | " + " | ".join(cells) + f" | {available / 1e9:.1f} | {done} | {failed} |")
    warm = samples[min(3, len(samples) - 1)]
    last = samples[-1]
    for n in names:
        if n in warm[1] and n in last[1]:
            print(f"{n}: {warm[1][n] / 1e6:.0f} MB at {warm[0]:.0f} s -> "
                  f"{last[1][n] / 1e6:.0f} MB at {last[0]:.0f} s "
                  f"({(last[1][n] - warm[1][n]) / 1e6:+.0f} MB)")


if __name__ == "__main__":
    main()
