"""A decode step's linear layers alone: the project's kernels (``models/gemv``: the
matrix-vector kernel, the tensor-core kernel) against MLX's matmul (cuBLAS on the CUDA build, what mlx-lm's step runs), per
weight shape and number of activation rows, from CUDA's activity records
(``device_profile.profile``).

Each case multiplies the same rows by enough distinct bf16 weights (at least
``--bytes`` of them) that no weight is read from the device's cache; it reports
the device time per product and the weight bytes read per second. Each kernel runs
with its own choices and with each other one given (``--per-warp`` and
``--split-unroll`` for the vector kernel, ``--tiles`` for the tensor-core one), to
show which is the faster where.

    python -m benchmarks.linear_kernels [--shapes llama-3-8b qwen3-0.6b]
        [--rows 1 2 4 8 16 32] [--per-warp 1 2 4 8] [--split-unroll 2-2 4-4]
        [--tiles 2-4-4 1-2-4] [--matmul-only]
        [--steps 20] [--out DIR]
"""

import argparse
import functools
import json
from pathlib import Path

from benchmarks.device_profile import kernels_ms, profile, write_results

# The fused decode step's four products per layer: (name, out features, in features).
SHAPES = {
    "llama-3-8b": [("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096),
                   ("down", 4096, 14336)],
    "qwen3-0.6b": [("qkv", 4096, 1024), ("o", 1024, 2048), ("gate_up", 6144, 1024),
                   ("down", 1024, 3072)],
    # mlx-lm's own products (projections apart): a layer runs q, k, v, o, gate, up, down.
    "llama-3-8b-apart": [("q", 4096, 4096), ("k/v", 1024, 4096), ("gate/up", 14336, 4096)],
    "qwen3-0.6b-apart": [("q", 2048, 1024), ("k/v", 1024, 1024), ("gate/up", 3072, 1024)],
}
# A first run joined each step's products by concatenation and showed a copy kernel per
# product taking 5x a product's time; steps now join them by additions, and the joining
# kernels are left out of the times (``device_profile.JOINING``).


def product_steps(out_features: int, in_features: int, rows: int, copies: int,
                  per_warp: list[int], tiles: list[tuple],
                  split_unroll: list[tuple] = (), matmul_only: bool = False) -> dict:
    """Each way of computing the products, as a function that launches ``copies`` of
    them (one per weight) and returns their outputs' sum."""
    import mlx.core as mx

    from vllm_metal.device import on_cuda
    from vllm_metal.models import gemv

    weights = [mx.random.normal((out_features, in_features), key=mx.random.key(i))
               .astype(mx.bfloat16) for i in range(copies)]
    x = mx.random.normal((rows, in_features), key=mx.random.key(copies)).astype(mx.bfloat16)
    mx.eval(weights, x)

    def joined(product):
        return lambda: functools.reduce(mx.add, [product(x, w) for w in weights])

    steps = {"matmul": joined(lambda x, w: x @ w.T)}
    if matmul_only:  # the same product with the weight as cuBLAS's first operand
        steps["matmul, weight first"] = joined(lambda x, w: (w @ x.T).T)
    if matmul_only or not on_cuda():
        return steps
    if rows <= gemv.MAX_ROWS:
        steps["vector"] = joined(lambda x, w: gemv.small_batch_linear(x, w, kernel="vector"))
        for r in per_warp:
            if r != gemv.rows_per_warp(rows):
                steps[f"vector, {r} rows a warp"] = joined(
                    lambda x, w, r=r: gemv.small_batch_linear(x, w, kernel="vector", per_warp=r))
        for split, unroll in split_unroll:
            if (split, unroll) != gemv.vector_choice(rows):
                steps[f"vector, split {split} unroll {unroll}"] = joined(
                    lambda x, w, s=split, u=unroll: gemv.small_batch_linear(
                        x, w, kernel="vector", split=s, unroll=u))
    if rows <= gemv.TENSOR_MAX_ROWS:
        steps["tensor"] = joined(lambda x, w: gemv.small_batch_linear(x, w, kernel="tensor"))
        for t in tiles:
            if t != gemv.TENSOR_TILES:
                steps["tensor, tiles " + "-".join(map(str, t))] = joined(
                    lambda x, w, t=t: gemv.small_batch_linear(x, w, kernel="tensor", tiles=t))
    return steps


def measure(shape: str, rows: int, per_warp: list[int], tiles: list[tuple], steps: int,
            min_bytes: int, split_unroll: list[tuple] = (), matmul_only: bool = False) -> list[dict]:
    results = []
    for name, out_features, in_features in SHAPES[shape]:
        weight_bytes = 2 * out_features * in_features
        copies = max(2, -(-min_bytes // weight_bytes))
        for method, step in product_steps(out_features, in_features, rows, copies,
                                          per_warp, tiles, split_unroll, matmul_only).items():
            result = profile(step, steps, pipelined=True, top=6)
            us = 1e3 * kernels_ms(result, copies)[0]
            results.append({"shape": shape, "product": name, "rows": rows, "method": method,
                            "us": round(us, 2),
                            "gb_per_s": round(weight_bytes / us / 1e3, 1) if us == us and us > 0
                            else None,
                            "top": result.get("top", result.get("note"))})
            print(json.dumps({k: v for k, v in results[-1].items() if k != "top"}), flush=True)
    return results


def table(results: list[dict]) -> str:
    methods = list(dict.fromkeys(r["method"] for r in results))
    lines = ["Device time per product (us) and weight bytes read per second (GB/s), bf16.", "",
             "| shape | product | rows | " + " | ".join(methods) + " |",
             "| --- | --- | --- | " + " | ".join("---" for _ in methods) + " |"]
    cases = dict.fromkeys((r["shape"], r["product"], r["rows"]) for r in results)
    for shape, product, rows in cases:
        cells = []
        for method in methods:
            found = [r for r in results if (r["shape"], r["product"], r["rows"], r["method"])
                     == (shape, product, rows, method)]
            cells.append(f"{found[0]['us']} ({found[0]['gb_per_s']})" if found else "")
        lines.append(f"| {shape} | {product} | {rows} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=["llama-3-8b"])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--per-warp", type=int, nargs="*", default=[1, 2, 4, 8])
    parser.add_argument("--split-unroll", nargs="*", default=["1-4", "2-2", "4-2", "4-4"],
                        help="vector kernel: SPLIT-UNROLL beside its own choice (gemv.vector_choice)")
    parser.add_argument("--tiles", nargs="*", default=["2-4-4", "1-2-4", "1-4-8"],
                        help="tensor-core tilings to try: GROUPS-UNROLL-SPLIT (gemv.TENSOR_TILES)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--bytes", type=int, default=512 * 1024**2,
                        help="weight bytes each step reads, at least (past the device's cache)")
    parser.add_argument("--matmul-only", action="store_true",
                        help="only MLX's matmul (as against the -apart shapes: fused or not)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    from vllm_metal.device import select_device

    select_device()
    tiles = [tuple(int(v) for v in t.split("-")) for t in args.tiles]
    split_unroll = [tuple(int(v) for v in t.split("-")) for t in args.split_unroll]
    results = [r for shape in args.shapes for rows in args.rows
               for r in measure(shape, rows, args.per_warp, tiles, args.steps, args.bytes,
                                split_unroll, args.matmul_only)]
    print(table(results))
    write_results(args.out, "linear_kernels", results, table(results))


if __name__ == "__main__":
    main()
