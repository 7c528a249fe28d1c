"""Single-stream decode of this checkout against an earlier commit's plugin, on the
same machine in one run: "did anything get slower?" without trusting figures from
another day (this VM's memory rate moves by a third between days).

    python -m benchmarks.commit_ab REF [--dtype float32] [--rounds 3] [--tokens 48]
        [--variant NAME:SETTING=VALUE[,SETTING=VALUE]] [--model DIR] [--out DIR]

REF's tree is checked out aside (``git worktree``) and its ``vllm_metal`` alone put
first on the path of a fresh worker process (``benchmarks.worker``: this checkout's
harness for every engine), so only the plugin differs. Each round runs every engine once,
the order reversed each round (A B, B A, ...); figures are medians over the rounds.
``--variant`` adds this checkout with settings (``VLLM_METAL_RUNNER_THREAD=0``...).
Writes ``commit_ab.json`` and ``commit_ab.md``.
"""

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.device_profile import parse_variant, write_results
from benchmarks.procs import PYTHON, REPO

PROMPT_LEN = 128


def checkout(ref: str, root: Path) -> Path:
    """A folder holding only REF's ``vllm_metal`` (its tree checked out beside it, once
    per commit): first on a worker's path, it gives REF's plugin and no other module."""
    commit = subprocess.run(["git", "rev-parse", "--short", ref], cwd=REPO, check=True,
                            capture_output=True, text=True).stdout.strip()
    tree, plugin = root / commit, root / f"{commit}-plugin"
    if not (tree / "vllm_metal").exists():
        subprocess.run(["git", "worktree", "add", "--detach", "-f", str(tree), commit], cwd=REPO,
                       check=True, capture_output=True)
    plugin.mkdir(parents=True, exist_ok=True)
    if not (plugin / "vllm_metal").exists():
        (plugin / "vllm_metal").symlink_to(tree / "vllm_metal")
    return plugin


def single_stream(plugin_root: Path, settings: dict, model: str, dtype: str, tokens: int,
                  prompt: list[int]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        spec = {"engine": "vllm", "model": model, "dtype": dtype, "kv_cache_bytes": 512 << 20,
                "max_model_len": 2048, "max_num_seqs": 4, "enforce_eager": False,
                "workloads": [{"kind": "single", "prompt": prompt, "max_tokens": tokens}]}
        Path(tmp, "spec.json").write_text(json.dumps(spec))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(plugin_root), str(REPO)]),
                   PYTHONUNBUFFERED="1", VLLM_METAL_USE_MLX="1", **settings)
        done = subprocess.run([PYTHON, "-m", "benchmarks.worker", f"{tmp}/spec.json",
                               f"{tmp}/result.json"], cwd=tmp, env=env, capture_output=True,
                              text=True, timeout=1800)
        if done.returncode:
            raise RuntimeError(f"{plugin_root}: the worker failed:\n{done.stderr[-3000:]}")
        return json.loads(Path(tmp, "result.json").read_text())["results"][0]


def measure(engines: dict[str, tuple[Path, dict]], model: str, dtype: str, rounds: int,
            tokens: int) -> list[dict]:
    rng = random.Random(0)
    vocab = json.loads(Path(model, "config.json").read_text())["vocab_size"]
    prompt = [rng.randrange(10, vocab - 10) for _ in range(PROMPT_LEN)]
    runs: dict[str, list[dict]] = {name: [] for name in engines}
    for i in range(rounds):
        order = list(engines) if i % 2 == 0 else list(engines)[::-1]
        for name in order:
            runs[name].append(single_stream(*engines[name], model, dtype, tokens, prompt))
            print(json.dumps({"engine": name, **runs[name][-1]}), flush=True)
    first = next(iter(engines))
    rows = []
    for name, results in runs.items():
        itl = statistics.median(r["itl_p50_ms"] for r in results)
        rows.append({"engine": name, "dtype": dtype,
                     "decode_tok_s": [round(r["decode_tok_s"], 3) for r in results],
                     "itl_p50_ms": round(itl, 1)})
    base = rows[0]["itl_p50_ms"]
    for row in rows:  # speed against the first engine: its ITL over this one's
        row[f"vs_{first}"] = round(base / row["itl_p50_ms"], 3)
    return rows


def table(rows: list[dict]) -> str:
    first = rows[0]["engine"]
    lines = [f"| engine | dtype | decode tok/s by round | ITL p50 ms (median) | speed vs {first} |",
             "| --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['engine']} | {r['dtype']} | {' / '.join(map(str, r['decode_tok_s']))} | "
                     f"{r['itl_p50_ms']} | {r[f'vs_{first}']:.3f}x |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ref", help="the earlier commit (any git revision)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--variant", action="append", type=parse_variant, default=[])
    parser.add_argument("--model", default=None, help="default: the small suite's Qwen3-0.6B shape")
    parser.add_argument("--trees", type=Path, default=Path(tempfile.gettempdir()) / "vllm-metal-ab")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.model is None:
        from benchmarks.models import qwen3_0_6b

        args.model = str(qwen3_0_6b())
    engines = {args.ref: (checkout(args.ref, args.trees), {}), "this checkout": (REPO, {})}
    engines.update({name: (REPO, settings) for name, settings in args.variant})
    rows = measure(engines, args.model, args.dtype, args.rounds, args.tokens)
    print(table(rows))
    write_results(args.out, "commit_ab", rows, table(rows))


if __name__ == "__main__":
    sys.exit(main())
