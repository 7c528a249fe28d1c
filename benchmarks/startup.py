"""What ``LLM(model)`` costs at startup, as typed (no options), and its first
generate: the engine's own log lines for loading, the KV cache and the decode
warm-up, beside the wall time of each part.

    python -m benchmarks.startup [--shapes qwen3-0.6b llama-3-8b] [--out DIR]

Each shape starts in a process of its own (random bf16 weights written with
``benchmarks.gpu.write_model``), so one shape's failure leaves the others' rows.
Writes ``startup.md`` and ``startup.json`` under ``--out``.
"""

import argparse
import json
import multiprocessing
import os
import re
import tempfile
import time
from pathlib import Path

from benchmarks.gpu import SHAPES, output_to, prompts, stop, write_model
from benchmarks.overhead import STEP_LINE, step_ms, step_parts

LOG_LINES = {"warm_up": r"Warm-up \(.*\) took ([\d.]+) s",
             "decode_steps": r"Decode steps traced and run for (.*)",
             "kv_cache": r"(GPU KV cache size: .*|KV cache .* blocks.*)",
             "max_num_seqs": r"max_num_seqs=(\d+)"}


def slowest_steps(log_text: str, count: int = 3) -> list[str]:
    """The steps (VLLM_METAL_DEBUG's lines) whose parts took the most host time,
    as "N reqs, T tokens, F forwards: X ms"."""
    steps = []
    for match in STEP_LINE.finditer(log_text):
        ms = step_ms(step_parts(match))
        forwards = int(match["forwards"] or 1)
        steps.append((ms, f"{match['reqs']} reqs, {match['tokens']} tokens, {forwards} forward"
                          + ("s" if forwards > 1 else "")))
    return [f"{what}: {ms:.0f} ms" for ms, what in sorted(steps, reverse=True)[:count]]


def measure(shape: str, models: Path, out: Path, queue) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    os.environ["VLLM_METAL_DEBUG"] = "1"  # each step's line: where the first generate went
    model_dir = write_model(shape, models)
    log = out / f"startup-{shape}.log"
    log.unlink(missing_ok=True)
    row = {"shape": shape}
    start = time.perf_counter()
    try:
        with output_to(log):
            llm = LLM(str(model_dir))
        row["startup_s"] = round(time.perf_counter() - start, 2)
        batch = SHAPES[shape][1][-1]
        params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
        vocab = llm.llm_engine.model_config.get_vocab_size()
        start = time.perf_counter()
        with output_to(log):
            llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts(batch, vocab)], params,
                         use_tqdm=False)
        row["first_generate_s"] = round(time.perf_counter() - start, 2)
        row["first_generate_batch"] = batch
        row["status"] = "ok"
        stop(llm)
    except Exception as error:  # noqa: BLE001 - a failed start is a row of the table
        row["status"] = f"{type(error).__name__}: {error}"[:300]
    text = log.read_text(errors="replace") if log.exists() else ""
    for key, pattern in LOG_LINES.items():
        found = re.findall(pattern, text)
        row[key] = found[0] if found else None
    row["traces_after_startup"] = len(re.findall(r"Decode step traced for", text))
    row["slowest_steps"] = slowest_steps(text)
    queue.put(row)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES),
                        default=["qwen3-0.6b", "llama-3-8b"])
    parser.add_argument("--models", type=Path, default=Path(tempfile.gettempdir()) / "vllm-metal-gpu")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    context = multiprocessing.get_context("spawn")
    for shape in args.shapes:
        queue = context.Queue()
        process = context.Process(target=measure, args=(shape, args.models, args.out, queue))
        process.start()
        try:
            row = queue.get(timeout=1200)
        except Exception:  # noqa: BLE001 - queue.Empty: the process died or stalled
            row = {"shape": shape, "status": f"no result (exit {process.exitcode})"}
        process.join(timeout=60)
        if process.is_alive():
            process.kill()
        print(json.dumps(row), flush=True)
        rows.append(row)
    (args.out / "startup.json").write_text(json.dumps(rows, indent=1))
    lines = ["| shape | status | startup s | of which warm-up s | decode steps | first generate s (batch) "
             "| its slowest steps |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['status']} | {r.get('startup_s', '-')} | {r.get('warm_up', '-')} "
                     f"| {r.get('decode_steps', '-')} | {r.get('first_generate_s', '-')} "
                     f"({r.get('first_generate_batch', '-')}) | {'; '.join(r.get('slowest_steps', []))} |")
    (args.out / "startup.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
