"""Tensor parallel on one host: where a TP=2 decode step goes, and memory per rank.

    python -m benchmarks.tensor_parallel [--model qwen3-0.6b|tiny-qwen3] [--steps 16]

Side by side in one run, each rank its own process, the machine's cores split
evenly among the ranks (OMP_NUM_THREADS, which OpenBLAS reads):
- the decode step of the plugin's sharded model (``distributed/tensor_parallel.py``)
  on MLX's ring backend over 127.0.0.1: with its all-reduces, with them made
  no-ops (compute only), and the all-reduces alone (one chained graph of the same
  count and size); communication share = (full - compute) / full;
- TP=1 vs TP=2 weights and resident memory per rank;
- single-stream decode through vLLM (``LLM(tensor_parallel_size=N)``), TP=1 vs TP=2.
Writes ``benchmarks/results/tensor_parallel.md`` and ``.json``.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
PROMPT_TOKENS = 128


def rank_main(model: str, rank: int, world: int, steps: int) -> dict:
    """One rank: load its shard, prefill, then time decode steps three ways."""
    from vllm_metal.device import select_device

    select_device()
    import mlx.core as mx
    import psutil
    import torch
    from mlx.utils import tree_flatten
    from mlx_lm.models.cache import make_prompt_cache

    from vllm_metal.distributed.tensor_parallel import ReducedOutput, shard_model
    from vllm_metal.models.loader import load_model

    group = mx.distributed.init(backend="ring", strict=True) if world > 1 else None
    reduce = {"on": True, "count": 0}

    def all_sum(x):
        reduce["count"] += 1
        return mx.distributed.all_sum(x, group=group) if reduce["on"] else x

    transform = (lambda m: shard_model(m, rank, world, all_sum)) if world > 1 else None
    model_obj = load_model(model, torch.float32, transform)
    weights = sum(v.nbytes for _, v in tree_flatten(model_obj.parameters()))
    rss = psutil.Process().memory_info().rss
    hidden = model_obj.args.hidden_size
    assert world == 1 or any(isinstance(m, ReducedOutput) for _, m in model_obj.named_modules())

    def decode_steps(n: int) -> float:
        cache = make_prompt_cache(model_obj)
        mx.eval(model_obj(mx.arange(PROMPT_TOKENS)[None] % 500, cache=cache))
        token = mx.array([[7]])
        start = time.perf_counter()
        for _ in range(n):
            token = mx.argmax(model_obj(token, cache=cache)[:, -1:], axis=-1)
            mx.eval(token)
        return (time.perf_counter() - start) / n

    decode_steps(2)  # warm-up
    reduce["count"] = 0
    full = decode_steps(steps)
    reduces_per_step = reduce["count"] // (steps + 1) if world > 1 else 0
    reduce["on"] = False
    compute = decode_steps(steps)
    comm_alone = 0.0
    if world > 1:
        x = mx.ones((1, 1, hidden))
        mx.eval(x)
        start = time.perf_counter()
        for _ in range(steps):
            y = x
            for _ in range(reduces_per_step):
                y = mx.distributed.all_sum(y, group=group) * 0.5
            mx.eval(y)
        comm_alone = (time.perf_counter() - start) / steps
    return {"rank": rank, "world": world, "weights_bytes": weights, "rss_bytes": rss,
            "step_s": full, "compute_s": compute, "allreduce_alone_s": comm_alone,
            "allreduces_per_step": reduces_per_step}


def run_ranks(model: str, world: int, steps: int) -> list[dict]:
    threads = max(1, (os.cpu_count() or 2) // world)
    tmp = Path(tempfile.mkdtemp(prefix="tp-bench-"))
    hostfile = tmp / "hosts.json"
    ports = [_free_port() for _ in range(world)]
    hostfile.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in ports]))
    procs = []
    for rank in range(world):
        env = {**os.environ, "MLX_RANK": str(rank), "MLX_HOSTFILE": str(hostfile),
               "OMP_NUM_THREADS": str(threads), "OPENBLAS_NUM_THREADS": str(threads)}
        out = tmp / f"rank{rank}.json"
        procs.append((out, subprocess.Popen(
            [sys.executable, "-m", "benchmarks.tensor_parallel", "--rank-worker", model,
             str(rank), str(world), str(steps), str(out)], env=env, cwd=REPO)))
    for _, p in procs:
        if p.wait(1800) != 0:
            raise RuntimeError(f"a TP={world} rank failed")
    return [json.loads(out.read_text()) for out, _ in procs]


def engine_decode(model: str, tp: int, max_tokens: int) -> float:
    """Single-stream decode tok/s through vLLM, in its own process."""
    code = f"""
import json, time
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
if __name__ == "__main__":
    llm = LLM({model!r}, tensor_parallel_size={tp}, dtype="float32", max_model_len=1024,
              kv_cache_memory_bytes=256 << 20, seed=0)
    prompt = TokensPrompt(prompt_token_ids=[(i * 7) % 500 for i in range({PROMPT_TOKENS})])
    params = SamplingParams(temperature=0, max_tokens={max_tokens}, ignore_eos=True)
    llm.generate(prompt, SamplingParams(temperature=0, max_tokens=4))
    start = time.perf_counter()
    out = llm.generate(prompt, params)[0]
    elapsed = time.perf_counter() - start
    first = out.metrics.first_token_latency if out.metrics else 0.0
    print("RESULT", json.dumps({{"tok_s": ({max_tokens} - 1) / (elapsed - first)}}))
    llm.llm_engine.engine_core.shutdown()
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=REPO, timeout=1800)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])["tok_s"]
    raise RuntimeError(f"TP={tp} engine run failed:\n{done.stderr[-3000:]}")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def report(model_name: str, tp1: dict, tp2: list[dict], engine: dict, steps: int) -> str:
    ms = lambda s: f"{s * 1e3:.1f} ms"
    gb = lambda b: f"{b / 1e9:.2f} GB"
    r0 = tp2[0]
    comm = r0["step_s"] - r0["compute_s"]
    lines = [
        f"# Tensor parallel, {model_name}, float32, ring backend on 127.0.0.1",
        "",
        f"Decode step at batch 1 after a {PROMPT_TOKENS}-token prompt, mean of {steps} steps; "
        f"{os.cpu_count()} cores split evenly among the ranks.",
        "",
        "| | TP=1 | TP=2 (rank 0) | TP=2 (rank 1) |",
        "|---|---|---|---|",
        f"| decode step | {ms(tp1['step_s'])} | {ms(r0['step_s'])} | {ms(tp2[1]['step_s'])} |",
        f"| compute only (all-reduces made no-ops) | {ms(tp1['compute_s'])} | "
        f"{ms(r0['compute_s'])} | {ms(tp2[1]['compute_s'])} |",
        f"| communication = step - compute | - | {ms(comm)} ({comm / r0['step_s']:.0%}) | "
        f"{ms(tp2[1]['step_s'] - tp2[1]['compute_s'])} |",
        f"| the {r0['allreduces_per_step']} all-reduces alone | - | "
        f"{ms(r0['allreduce_alone_s'])} | {ms(tp2[1]['allreduce_alone_s'])} |",
        f"| weights per rank | {gb(tp1['weights_bytes'])} | {gb(r0['weights_bytes'])} "
        f"({r0['weights_bytes'] / tp1['weights_bytes']:.0%}) | {gb(tp2[1]['weights_bytes'])} |",
        f"| resident memory per rank after load | {gb(tp1['rss_bytes'])} | "
        f"{gb(r0['rss_bytes'])} | {gb(tp2[1]['rss_bytes'])} |",
    ]
    if engine:
        lines += [
            "",
            "Single-stream decode through vLLM (`LLM(tensor_parallel_size=N)`):",
            "",
            "| TP=1 | TP=2 | ratio |",
            "|---|---|---|",
            f"| {engine[1]:.2f} tok/s | {engine[2]:.2f} tok/s | {engine[2] / engine[1]:.2f}x |",
        ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="qwen3-0.6b", choices=["qwen3-0.6b", "tiny-qwen3"])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--engine-tokens", type=int, default=32)
    parser.add_argument("--no-engine", action="store_true")
    parser.add_argument("--out", default=str(RESULTS / "tensor_parallel"))
    parser.add_argument("--rank-worker", nargs=5, metavar=("MODEL", "RANK", "WORLD", "STEPS", "OUT"))
    args = parser.parse_args(argv)
    if args.rank_worker:
        model, rank, world, steps, out = args.rank_worker
        result = rank_main(model, int(rank), int(world), int(steps))
        Path(out).write_text(json.dumps(result))
        return 0
    from benchmarks.models import PREPARERS

    model = str(PREPARERS[args.model]())
    tp1 = run_ranks(model, 1, args.steps)[0]
    tp2 = run_ranks(model, 2, args.steps)
    engine = {} if args.no_engine else {tp: engine_decode(model, tp, args.engine_tokens)
                                        for tp in (1, 2)}
    table = report(args.model, tp1, tp2, engine, args.steps)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(table)
    out.with_suffix(".json").write_text(json.dumps(
        {"tp1": tp1, "tp2": tp2, "engine_tok_s": engine}, indent=1))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
