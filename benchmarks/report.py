"""Markdown tables and the throughput-against-concurrency plot."""

import math
from pathlib import Path

from benchmarks.targets import Target

VERDICT = {True: "met", False: "**missed**", None: "not measured"}


def fmt(value, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def ratio(a, b) -> str:
    return f"{a / b:.2f}x" if a is not None and b else "n/a"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def other(row: dict) -> str:
    share = row.get("other_cpu")
    return "n/a" if share is None else f"{100 * share:.0f}%"


def ok(row: dict) -> bool:
    return str(row.get("status", "")).startswith("ok")


def status_cells(row: dict, width: int) -> list[str]:
    """A row that did not run: its status in the first cell, the rest empty."""
    return [str(row["status"]).replace("|", "/")[:160]] + [""] * (width - 1)


def targets_section(targets: list[Target]) -> list[str]:
    rows = [[t.name, t.measured, VERDICT[t.met]] for t in targets]
    return ["## Targets", ""] + table(["target", "measured", "verdict"], rows)


def single_section(results: dict, scale) -> list[str]:
    rows = [r for r in results["offline"] if r["kind"] == "single"]
    ceilings = results["ceilings"]
    header = ["engine", "dtype", "decode tok/s", "vs mlx-lm", "% of bandwidth limit",
              "TTFT s", "ITL p50 ms", "startup s", "other CPU", "decode tok/s by round"]
    body = []
    for dtype in scale.single_dtypes:
        mlx = next((r for r in rows if r["engine"] == "mlx-lm" and r["dtype"] == dtype and ok(r)), None)
        ceiling = ceilings[dtype]["ceiling_tok_s"]
        body.append(["bandwidth limit", dtype, fmt(ceiling), ratio(ceiling, mlx and mlx["decode_tok_s"]),
                     "100%", "", "", "", "", ""])
        for row in (r for r in rows if r["dtype"] == dtype):
            if not ok(row):
                body.append([row["engine"], dtype] + status_cells(row, len(header) - 2))
                continue
            body.append([row["engine"], dtype, fmt(row["decode_tok_s"]),
                         ratio(row["decode_tok_s"], mlx and mlx["decode_tok_s"]),
                         f"{100 * row['decode_tok_s'] / ceiling:.0f}%", fmt(row["ttft_s"]),
                         fmt(row["itl_p50_ms"], 1), fmt(row["startup_s"], 1), other(row),
                         " / ".join(fmt(v) for v in row.get("round_decode_tok_s", []))])
    c = ceilings[scale.single_dtypes[0]]
    title = (f"## Single-stream decode: {scale.single_model}, prompt {scale.single_prompt_len}, "
             f"{scale.single_new_tokens} new tokens, greedy, ignore_eos")
    note = (f"Bandwidth limit = {results['bandwidth']['bandwidth_gb_s']:.1f} GB/s / bytes read per step "
            f"({c['weight_bytes'] / 1e9:.2f} GB of weights at {scale.single_dtypes[0]} + mean KV); "
            "decode tok/s excludes the first token (prefill); for vllm-metal and mlx-lm it is the mean "
            "of two rounds run in the order vllm-metal, mlx-lm, mlx-lm, vllm-metal. 4bit: the same "
            "model quantized by mlx_lm.convert (4-bit, group 64, float32 scales), loaded at float32, "
            "weights counted as stored; vllm-metal dequantizes it at load on the CPU device (its "
            "default there), vllm-metal-4bit-kernels runs MLX's quantized kernels as mlx-lm does.")
    return [title, "", note, ""] + table(header, body)


def overhead_section(results: dict) -> list[str]:
    rows = [r for r in results["offline"] if r["kind"] == "single" and r["engine"] == "vllm-metal"
            and ok(r) and r.get("step")]
    header = ["dtype", "step (ITL p50) ms", "forward issue ms", "forward wait ms", "prepare ms",
              "sample ms", "outside runner ms", "overhead share"]
    body = [[r["dtype"], fmt(s["step_ms"], 1), fmt(s["forward_issue_ms"], 1), fmt(s["forward_wait_ms"], 1),
             fmt(s["prepare_ms"], 2), fmt(s["sample_ms"], 2), fmt(s["outside_runner_ms"], 1),
             f"{100 * s['overhead_share']:.1f}%"] for r in rows for s in [r["step"]]]
    note = ("From VLLM_METAL_DEBUG=1 step lines (medians over the decode steps); forward issue = "
            "graph building + MLX's issue; forward wait = the wait for this step's logits, or with "
            "asynchronous scheduling for the step before; overhead share = "
            "1 - (forward issue + forward wait) / step.")
    return ["## Per-step overhead of vllm-metal at batch 1", "", note, ""] + table(header, body)


def batch_section(results: dict, scale) -> list[str]:
    rows = [r for r in results["offline"] if r["kind"] == "batch"]
    mlx = next((r for r in rows if r["engine"] == "mlx-lm" and ok(r)), None)
    header = ["engine", "output tok/s", "vs mlx-lm", "elapsed s", "output tokens", "other CPU"]
    body = []
    for row in rows:
        if not ok(row):
            body.append([row["engine"]] + status_cells(row, len(header) - 1))
            continue
        versus = ratio(row["output_tok_s"], mlx and mlx["output_tok_s"])
        body.append([row["engine"], fmt(row["output_tok_s"]), versus,
                     fmt(row["elapsed_s"], 1), str(row["output_tokens"]), other(row)])
    lo, hi = scale.batch_prompt_range
    title = (f"## Offline batch: {scale.concurrency_model} ({scale.concurrency_dtype}), "
             f"{scale.batch_requests} requests, prompts {lo}-{hi} tokens, "
             f"{scale.batch_new_tokens} new tokens each")
    apis = "vllm-metal and vLLM CPU: `LLM.generate`; mlx-lm: `BatchGenerator` (what `batch_generate` drives)."
    return [title, "", apis, ""] + table(header, body)


def forward_ceiling(results: dict) -> dict | None:
    return next((r for r in results["offline"] if r["kind"] == "forward" and ok(r)), None)


def ceiling_share(row: dict, ceiling: dict | None) -> str:
    limit = ceiling and ceiling["ceiling_tok_s"].get(str(row["concurrency"]))
    return f"{100 * row['output_tok_s'] / limit:.0f}%" if limit else "n/a"


def ceiling_section(results: dict, scale) -> list[str]:
    ceiling = forward_ceiling(results)
    if ceiling is None:
        return []
    steps = ceiling["decode_step_ms"]
    body = [[str(c), fmt(steps[str(c)], 1), fmt(ceiling["ceiling_tok_s"][str(c)])]
            for c in scale.serve_concurrencies]
    note = (f"mlx-lm's model forward alone on its dense caches, the best of 5 timings each, measured "
            f"in this run: prefill "
            f"{ceiling['prefill_tok_s']:.0f} tok/s (best of batch 1 and {ceiling['prefill_batch']}), "
            f"decode steps at context {ceiling['decode_context']}. c requests need c prefills of "
            f"{scale.serve_prompt_len} tokens and {scale.serve_output_len - 1} decode steps of batch c: "
            "no engine can serve this workload faster with these MLX kernels.")
    return (["## MLX forward ceiling for the serving workload", "", note, ""]
            + table(["concurrency", "decode step ms", "ceiling output tok/s"], body))


def serving_section(results: dict, scale) -> list[str]:
    rows = [r for r in results["serving"] if r["kind"] == "serving"]
    ceiling = forward_ceiling(results)
    header = ["server", "concurrency", "output tok/s", "vs mlx_lm.server", "% of MLX ceiling",
              "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms", "other CPU"]
    body = []
    for row in sorted(rows, key=lambda r: (r["concurrency"], r["engine"])):
        if not ok(row):
            body.append([row["engine"], str(row["concurrency"])] + status_cells(row, len(header) - 2))
            continue
        mlx = next((r for r in rows if r["engine"] == "mlx_lm.server"
                    and r["concurrency"] == row["concurrency"] and ok(r)), None)
        body.append([row["engine"], str(row["concurrency"]), fmt(row["output_tok_s"]),
                     ratio(row["output_tok_s"], mlx and mlx["output_tok_s"]),
                     ceiling_share(row, ceiling), fmt(row["ttft_p50_ms"], 0),
                     fmt(row["ttft_p99_ms"], 0), fmt(row["itl_p50_ms"], 1), fmt(row["itl_p99_ms"], 1),
                     other(row)])
    title = (f"## Online serving: `vllm bench serve`, random {scale.serve_prompt_len} tokens in, "
             f"{scale.serve_output_len} out, {scale.concurrency_model} ({scale.concurrency_dtype})")
    return [title, ""] + table(header, body)


def prefix_section(results: dict, scale) -> list[str]:
    rows = [r for r in results["serving"] if r["kind"] == "prefix"]
    header = ["server", "prefix caching", "TTFT 1st request ms", "TTFT p50 of the rest ms", "TTFT p50 all ms",
              "other CPU"]
    body = []
    for row in rows:
        caching = "on" if row["prefix_caching"] else "off (--no-enable-prefix-caching)"
        if not ok(row):
            body.append([row["engine"], caching] + status_cells(row, len(header) - 2))
            continue
        body.append([row["engine"], caching, fmt(row["ttft_first_ms"], 0), fmt(row["ttft_rest_p50_ms"], 0),
                     fmt(row["ttft_all_p50_ms"], 0), other(row)])
    title = (f"## Prefix caching: {scale.prefix_requests} requests sharing a {scale.prefix_len}-token prefix "
             f"(+{scale.prefix_suffix_len} own tokens, {scale.prefix_output_len} out), concurrency 1")
    note = "mlx_lm.server keeps its own prompt cache (always on)."
    return [title, "", note, ""] + table(header, body)


def markdown(results: dict, scale, targets: list[Target]) -> str:
    bw = results["bandwidth"]
    head = [
        f"# vllm-metal side-by-side benchmark: scale `{scale.name}`",
        "",
        f"Command: `{results['command']}`  ",
        f"Machine: {results['machine']}  ",
        f"Memory bandwidth: {bw['bandwidth_gb_s']:.1f} GB/s, the best of: copy {bw['copy_gb_s']:.1f} "
        f"(read + write), sum {bw['sum_gb_s']:.1f} (1 thread: {bw['sum_1_thread_gb_s']:.1f}), "
        f"gemv {bw['gemv_gb_s']:.1f} GB/s  ",
        f"Total time: {results['elapsed_s'] / 60:.1f} min  ",
        "\"other CPU\": the machine's CPU time that processes outside this run used during that "
        "measurement (server sessions: over all their runs). Above a few percent the figures are "
        "disturbed: on a 2-core CPU one busy neighbour can slow an MLX forward several-fold.",
        "",
    ]
    sections = [targets_section(targets), single_section(results, scale), overhead_section(results),
                batch_section(results, scale), ceiling_section(results, scale),
                serving_section(results, scale),
                prefix_section(results, scale)]
    return "\n".join(head + [line for s in sections for line in s + [""]])


def plot(results: dict, scale, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    rows = [r for r in results["serving"] if r["kind"] == "serving" and ok(r)]
    for engine in sorted({r["engine"] for r in rows}):
        points = sorted((r["concurrency"], r) for r in rows if r["engine"] == engine)
        xs = [c for c, _ in points]
        left.plot(xs, [r["output_tok_s"] for _, r in points], marker="o", label=engine)
        right.plot(xs, [r["itl_p99_ms"] for _, r in points], marker="o", label=engine)
    ceiling = forward_ceiling(results)
    if ceiling:
        xs = list(scale.serve_concurrencies)
        left.plot(xs, [ceiling["ceiling_tok_s"][str(c)] for c in xs], linestyle="--", color="gray",
                  label="MLX forward ceiling")
    for axis, label in ((left, "output tokens/s"), (right, "ITL p99 (ms)")):
        axis.set_xscale("log", base=2)
        axis.set_xticks(list(scale.serve_concurrencies), [str(c) for c in scale.serve_concurrencies])
        axis.set_xlabel("concurrency (vllm bench serve --max-concurrency)")
        axis.set_ylabel(label)
        axis.grid(True, alpha=0.3)
        axis.legend()
    fig.suptitle(f"{scale.concurrency_model} ({scale.concurrency_dtype}), scale {scale.name}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
