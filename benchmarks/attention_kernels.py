"""Each decode attention kernel's device time alone, beside MLX's fused attention
over a dense cache (what mlx-lm's decode step runs), from CUDA's activity
records (``device_profile.profile``).

Kernels: the fused decode step's attention (``attention/fused_decode``, writing
in place and handing keys back), and the paged decode kernel
(``attention/decode_kernel``) with a key per warp and a key per lane. Each runs
alone on random data at every batch and context given, ``--layers`` times a
step on as many distinct caches (as a model's layers: one launch alone leaves the
device idle between steps, where it runs slower, and one cache would be read from
the device's cache); per launch, the kernels' summed time over ``--steps`` steps
divided by the launches (the additions that join a step's outputs left out).

    python -m benchmarks.attention_kernels [--heads 32 8 128] [--batch 1 8]
        [--context 128 1024] [--layers 32] [--warps 8 16 32] [--steps 20] [--out DIR]

``--warps``: the fused kernel also with that many warps a block (its default is
``decode_kernel.WARPS``).
"""

import argparse
import functools
import json
from pathlib import Path

import numpy as np

from benchmarks.device_profile import kernels_ms, profile, write_results


def paged_case(batch: int, heads: int, kv_heads: int, head_dim: int, context: int,
               block_size: int = 16, seed: int = 0):
    """A bf16 pool holding every request's ``context`` keys and values in shuffled
    blocks, the rows to read and write, each request's position and its q/k/v row."""
    import mlx.core as mx

    rng = np.random.default_rng(seed)
    blocks_each = -(-(context + 1) // block_size)
    num_blocks = 1 + batch * blocks_each
    pool = mx.array(rng.standard_normal((num_blocks * 2 * kv_heads * block_size, head_dim)),
                    dtype=mx.bfloat16)
    tables = 1 + rng.permutation(batch * blocks_each).reshape(batch, blocks_each)
    first = (tables[:, None, :] * 2 * kv_heads + np.arange(kv_heads)[None, :, None]) * block_size
    first = np.concatenate([first, first + kv_heads * block_size])
    rows = (first[..., None] + np.arange(block_size)).reshape(2 * batch, kv_heads, -1)
    positions = np.full(batch, context - 1)
    write = rows[np.arange(2 * batch), :, np.concatenate([positions] * 2)][:, :, None]
    qkv = mx.array(rng.standard_normal((batch, 1, (heads + 2 * kv_heads) * head_dim)),
                   dtype=mx.bfloat16)
    return (qkv, pool, mx.array(positions.astype(np.int32)), mx.array(write.astype(np.int32)),
            mx.array(rows.astype(np.int32)))


def kernel_steps(batch: int, heads: int, kv_heads: int, head_dim: int, context: int,
                 layers: int, warps: list[int] = ()) -> dict:
    """Each kernel as a function that launches it once per layer and returns the
    outputs' sum (the project's kernels on MLX's CUDA build only)."""
    import mlx.core as mx

    from vllm_metal.attention import decode_kernel, fused_decode
    from vllm_metal.device import on_cuda

    inv_freq = mx.array(10000.0 ** (-np.arange(0, head_dim, 2) / head_dim), dtype=mx.float32)
    norm = mx.ones((head_dim,), mx.bfloat16)
    scale = head_dim ** -0.5
    cases = []
    for layer in range(layers):
        qkv, pool, positions, write_rows, read_rows = paged_case(batch, heads, kv_heads, head_dim,
                                                                 context, seed=layer)
        queries = qkv[..., :heads * head_dim].reshape(batch, 1, heads, head_dim)
        queries = mx.contiguous(queries.transpose(0, 2, 1, 3))
        keys = mx.random.normal((batch, kv_heads, context, head_dim)).astype(mx.bfloat16)
        values = mx.random.normal((batch, kv_heads, context, head_dim)).astype(mx.bfloat16)
        mx.eval(qkv, pool, positions, write_rows, read_rows, queries, keys, values)
        cases.append((qkv, pool, positions, write_rows, read_rows, queries, keys, values))

    def summed(launch):
        return lambda: functools.reduce(mx.add, [launch(*case) for case in cases])

    def fused(write: bool, warps: int = decode_kernel.WARPS):
        def launch(qkv, pool, positions, write_rows, read_rows, *_):
            out = fused_decode.fused_decode_attention(
                qkv, pool, positions, write_rows, read_rows, heads, kv_heads, scale, inv_freq,
                False, norm, norm, 1e-6, write=write, warps=warps)
            return out if write else out[0]
        return summed(launch)

    def paged(key_per_lane: bool):
        return summed(lambda qkv, pool, positions, write_rows, read_rows, queries, *_:
                      decode_kernel.paged_decode_attention(queries, pool, read_rows, positions,
                                                           scale, key_per_lane=key_per_lane))

    steps = {"mlx sdpa, dense": summed(
        lambda *case: mx.fast.scaled_dot_product_attention(case[5], case[6], case[7], scale=scale))}
    if on_cuda():
        steps.update({"fused, in place": fused(True), "fused, handed back": fused(False),
                      "paged, key per warp": paged(False), "paged, key per lane": paged(True)})
        steps.update({f"fused, in place, {w} warps": fused(True, w) for w in warps
                      if w != decode_kernel.WARPS})
    return steps


def measure(batch: int, heads: int, kv_heads: int, head_dim: int, context: int, layers: int,
            steps: int, warps: list[int] = ()) -> list[dict]:
    rows = []
    for name, step in kernel_steps(batch, heads, kv_heads, head_dim, context, layers,
                                   warps).items():
        result = profile(step, steps, pipelined=True, top=6)
        ms, kernels = kernels_ms(result, layers)  # the additions joining outputs left out
        rows.append({"kernel": name, "batch": batch, "context": context, "layers": layers,
                     "us_per_launch": round(1e3 * ms, 2), "kernels_per_launch": kernels,
                     "top": result.get("top", result.get("note"))})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def table(rows: list[dict], heads: tuple) -> str:
    lines = [f"Heads {heads[0]} query / {heads[1]} KV, head size {heads[2]}, bf16; "
             "device time per launch (us).", "",
             "| kernel | batch | context | us per launch | kernels per launch |",
             "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r['kernel']} | {r['batch']} | {r['context']} | {r['us_per_launch']} | "
              f"{r['kernels_per_launch']} |" for r in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", type=int, nargs=3, default=[32, 8, 128],
                        metavar=("QUERY", "KV", "SIZE"))
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--context", type=int, nargs="+", default=[128, 1024])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--warps", type=int, nargs="*", default=[8, 16, 32])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    from vllm_metal.device import select_device

    select_device()
    rows = [row for batch in args.batch for context in args.context
            for row in measure(batch, *args.heads, context, args.layers, args.steps, args.warps)]
    print(table(rows, tuple(args.heads)))
    write_results(args.out, "attention_kernels", rows, table(rows, tuple(args.heads)))


if __name__ == "__main__":
    main()
