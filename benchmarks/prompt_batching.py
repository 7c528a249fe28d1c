"""Serving with prompts padded into one forward (the default) against each prompt in a
forward of its own (``VLLM_METAL_BATCH_PROMPTS=0``): both servers up at once, bursts
of concurrent requests with prompts of varied length sent to each in turn (A B A ...).

    python -m benchmarks.prompt_batching [--model models/SmolLM2-135M-Instruct]
        [--clients 16] [--rounds 6] [--min-len 50] [--max-len 300] [--tokens 64]

A burst's wall time covers its prompts' steps and every decode step after; its
output tok/s is the figure. Writes ``prompt_batching.md`` and ``.json`` under ``--out``.
"""

import argparse
import json
import random
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.gpu import RESULTS

REPO = Path(__file__).resolve().parent.parent
SETTINGS = {"together": "1", "alone": "0"}


def burst(url: str, model: str, prompts: list[list[int]], tokens: int) -> float:
    """Output tok/s of all ``prompts`` sent at once."""
    import requests

    def one(prompt):
        response = requests.post(url + "/v1/completions", timeout=600, json={
            "model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0,
            "ignore_eos": True})
        response.raise_for_status()
        return response.json()["usage"]["completion_tokens"]

    start = time.perf_counter()
    with ThreadPoolExecutor(len(prompts)) as pool:
        generated = sum(pool.map(one, prompts))
    return generated / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(REPO / "models" / "SmolLM2-135M-Instruct"))
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--min-len", type=int, default=50)
    parser.add_argument("--max-len", type=int, default=300)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--kv-bytes", default="512M")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    from vllm_metal.testing.server import Server

    rng = random.Random(0)
    args.out.mkdir(parents=True, exist_ok=True)
    servers = {name: Server([args.model, "--kv-cache-memory-bytes", args.kv_bytes],
                            env={"VLLM_METAL_BATCH_PROMPTS": value},
                            log_path=args.out / f"prompt_batching-{name}.log")
               for name, value in SETTINGS.items()}
    runs = {name: [] for name in servers}
    try:
        for server in servers.values():
            server.start()
        for r in range(-1, args.rounds):  # round -1: each server's first-call costs, not kept
            # Fresh prompts each round (no prefix cache hits), the same for both servers.
            prompts = [[rng.randrange(100, 40000) for _ in range(rng.randint(args.min_len, args.max_len))]
                       for _ in range(args.clients)]
            order = list(servers) if r % 2 else list(reversed(servers))
            for name in order:
                figure = burst(servers[name].url, args.model, prompts, args.tokens)
                if r >= 0:
                    runs[name].append(round(figure, 1))
            print(json.dumps({"round": r, **{n: v[-1] for n, v in runs.items() if v and r >= 0}}),
                  flush=True)
    finally:
        for server in servers.values():
            server.stop()
    ratios = [round(a / b, 3) for a, b in zip(runs["together"], runs["alone"])]
    result = {"model": args.model, "clients": args.clients, "prompt_lens": [args.min_len, args.max_len],
              "tokens": args.tokens, "runs": runs, "ratios": ratios,
              "median_ratio": statistics.median(ratios)}
    (args.out / "prompt_batching.json").write_text(json.dumps(result, indent=1))
    lines = [f"# Prompts padded together against each alone, served ({Path(args.model).name}, "
             f"{args.clients} concurrent requests of {args.min_len}-{args.max_len} prompt tokens, "
             f"{args.tokens} out)", "", "| round | together tok/s | alone tok/s | ratio |",
             "| --- | --- | --- | --- |"]
    lines += [f"| {i} | {a} | {b} | {r} |" for i, (a, b, r) in
              enumerate(zip(runs["together"], runs["alone"], ratios))]
    lines += ["", f"Median ratio {result['median_ratio']:.3f}."]
    (args.out / "prompt_batching.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
