"""The issue's targets, each checked against this run's figures."""

from dataclasses import dataclass

from benchmarks.scales import QUANTIZED


@dataclass
class Target:
    name: str
    measured: str
    met: bool | None  # None: could not be measured in this run


def _find(rows, **match):
    for row in rows:
        if all(row.get(k) == v for k, v in match.items()) and str(row.get("status", "")).startswith("ok"):
            return row
    return None


def single_stream(offline: list[dict], dtypes) -> list[Target]:
    """The same kernels on both sides: for the 4-bit checkpoint, the plugin on
    MLX's quantized kernels (the default plugin row dequantizes at load on CPU)."""
    targets = []
    for dtype in dtypes:
        engine = "vllm-metal-4bit-kernels" if dtype == QUANTIZED else "vllm-metal"
        ours = _find(offline, kind="single", engine=engine, dtype=dtype)
        theirs = _find(offline, kind="single", engine="mlx-lm", dtype=dtype)
        name = f"single-stream decode >= 1.0x mlx-lm ({dtype}, {engine})"
        if not (ours and theirs):
            targets.append(Target(name, "not measured", None))
            continue
        ratio = ours["decode_tok_s"] / theirs["decode_tok_s"]
        measured = f"{ratio:.2f}x ({ours['decode_tok_s']:.2f} vs {theirs['decode_tok_s']:.2f} tok/s)"
        targets.append(Target(name, measured, ratio >= 1.0))
    return targets


def concurrency(serving: list[dict], concurrencies, ceiling: dict | None) -> list[Target]:
    top = max(concurrencies)
    ours = _find(serving, kind="serving", engine="vllm serve", concurrency=top)
    theirs = _find(serving, kind="serving", engine="mlx_lm.server", concurrency=top)
    single = _find(serving, kind="serving", engine="vllm serve", concurrency=1)
    name = f"concurrency {top}: output tok/s >= 2x mlx_lm.server"
    if not (ours and theirs):
        return [Target(name, "not measured", None)]
    ratio = ours["output_tok_s"] / theirs["output_tok_s"]
    measured = f"{ratio:.2f}x ({ours['output_tok_s']:.1f} vs {theirs['output_tok_s']:.1f} tok/s)"
    limit = ceiling and ceiling["ceiling_tok_s"].get(str(top))
    if limit:
        measured += (f"; the MLX forward ceiling is {limit:.1f} tok/s "
                     f"({2 * theirs['output_tok_s'] / limit:.2f}x of it would be needed)")
    targets = [Target(name, measured, ratio >= 2.0)]
    name = f"concurrency {top}: p99 ITL <= 2x single-stream ITL"
    if single:
        limit = 2 * single["itl_p50_ms"]
        measured = f"{ours['itl_p99_ms']:.0f} ms vs limit {limit:.0f} ms (2 x {single['itl_p50_ms']:.0f})"
        step = ceiling and ceiling["decode_step_ms"].get(str(top))
        if step:
            measured += f"; the MLX forward's batch-{top} decode step alone takes {step:.0f} ms"
        targets.append(Target(name, measured, ours["itl_p99_ms"] <= limit))
    else:
        targets.append(Target(name, "not measured", None))
    return targets


def step_overhead(offline: list[dict], dtypes) -> list[Target]:
    targets = []
    for dtype in dtypes:
        row = _find(offline, kind="single", engine="vllm-metal", dtype=dtype)
        name = f"per-step overhead outside the MLX forward < 10% at batch 1 ({dtype})"
        step = row and row.get("step")
        if not step:
            targets.append(Target(name, "not measured (no VLLM_METAL_DEBUG step lines)", None))
            continue
        measured = (f"{100 * step['overhead_share']:.1f}% ({step['step_ms'] - step['forward_ms']:.1f} "
                    f"of {step['step_ms']:.1f} ms)")
        targets.append(Target(name, measured, step["overhead_share"] < 0.10))
    return targets


def prefix_cache(serving: list[dict], prefix_len: int) -> list[Target]:
    warm = _find(serving, kind="prefix", engine="vllm serve", prefix_caching=True)
    cold = _find(serving, kind="prefix", engine="vllm serve", prefix_caching=False)
    name = f"prefix-cache TTFT ({prefix_len}-token cached prefix) <= 25% of cold"
    if not warm:
        return [Target(name, "not measured", None)]
    if cold:
        cold_ms, source = cold["ttft_all_p50_ms"], "no-prefix-caching server"
    else:
        cold_ms, source = warm["ttft_first_ms"], "first request"
    ratio = warm["ttft_rest_p50_ms"] / cold_ms
    measured = f"{100 * ratio:.0f}% ({warm['ttft_rest_p50_ms']:.0f} vs {cold_ms:.0f} ms, cold: {source})"
    return [Target(name, measured, ratio <= 0.25)]


def evaluate(results: dict, scale) -> list[Target]:
    offline, serving = results["offline"], results["serving"]
    return (single_stream(offline, scale.single_dtypes)
            + concurrency(serving, scale.serve_concurrencies, _find(offline, kind="forward"))
            + step_overhead(offline, [d for d in scale.single_dtypes if d != QUANTIZED])
            + prefix_cache(serving, scale.prefix_len))
