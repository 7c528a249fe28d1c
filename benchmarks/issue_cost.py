"""What MLX's host spends issuing one primitive, by kind, at decode-step shapes.

Each kind builds ``--count`` primitives of one sort (chained where the op keeps
its shape, else independent), then times ``mx.async_eval`` of them: MLX
walking the graph, allocating and launching kernels (on CUDA: adding graph
nodes, committing graphs). Figures are microseconds per primitive, the median of
``--reps`` rounds after a warm-up round. Set ``MLX_*`` variables on the command
line to compare MLX's settings (they are read once, at MLX's first use).

``--large`` adds products of a Llama-3-8B-sized weight (gate/up fused: 4096 x 28672,
224 MiB), independent of each other: there the device takes longer than the host,
and the issue time shows whether ``mx.async_eval`` waits for the device (it then
approaches the products' device time) or only launches.

    python -m benchmarks.issue_cost [--count 400] [--reps 7] [--batch 1] [--large]
"""

import argparse
import json
import os
import statistics
import time


def kinds(mx, heads=16, kv_heads=8, head_dim=128, hidden=1024, context=256, batch=1,
          large=False):
    dt = mx.bfloat16
    w = mx.random.normal((hidden, hidden)).astype(dt) * 0.02
    x = mx.random.normal((batch, hidden)).astype(dt)
    q = mx.random.normal((batch, heads, 1, head_dim)).astype(dt)
    k = mx.random.normal((batch, kv_heads, context, head_dim)).astype(dt)
    v = mx.random.normal((batch, kv_heads, context, head_dim)).astype(dt)
    norm_w = mx.ones((head_dim,), dt)
    pool = mx.zeros((64 * 2 * kv_heads * 16, head_dim), dt)
    read_rows = mx.arange(2 * batch * kv_heads * context, dtype=mx.int32).reshape(
        2 * batch, kv_heads, context)
    write_rows = mx.arange(2 * batch * kv_heads, dtype=mx.int32).reshape(2 * batch, kv_heads, 1)
    new_kv = mx.random.normal((2 * batch, kv_heads, 1, head_dim)).astype(dt)
    bool_mask = mx.ones((batch, 1, 1, context), mx.bool_)
    offsets = mx.full((batch,), context, mx.int32)
    scale = head_dim ** -0.5
    mx.eval(w, x, q, k, v, norm_w, pool, read_rows, write_rows, new_kv, bool_mask, offsets)
    fused = mx.compile(lambda a: (a * 2 + 1) * a)
    double = mx.fast.cuda_kernel(
        name="issue_cost_double", input_names=["inp"], output_names=["out"],
        source="auto i = cooperative_groups::this_grid().thread_rank(); out[i] = inp[i] * T(2);",
    ) if mx.default_device() == mx.gpu and mx.cuda.is_available() else None

    def custom(a):
        return double(inputs=[a], template=[("T", a.dtype)], grid=(a.size, 1, 1),
                      threadgroup=(min(a.size, 256), 1, 1), output_shapes=[a.shape],
                      output_dtypes=[a.dtype])[0]

    def scatter_chain(n):
        p = pool
        for _ in range(n):
            p[write_rows] = new_kv
        return [p]

    table = {
        f"matmul [{batch},1024]x[1024,1024]": lambda n: [_chain(x, n, lambda a: a @ w)],
        "add (elementwise)": lambda n: [_chain(x, n, lambda a: a + 1)],
        "compiled elementwise (3 ops fused)": lambda n: [_chain(x, n, fused)],
        "rms_norm": lambda n: [_chain(q, n, lambda a: mx.fast.rms_norm(a, norm_w, 1e-6))],
        "rope (array offset)": lambda n: [_chain(q, n, lambda a: mx.fast.rope(
            a, head_dim, traditional=False, base=1e6, scale=1.0, offset=offsets))],
        "rope (int offset)": lambda n: [_chain(q, n, lambda a: mx.fast.rope(
            a, head_dim, traditional=False, base=1e6, scale=1.0, offset=context))],
        "sdpa, no mask": lambda n: [_chain(q, n, lambda a: mx.fast.scaled_dot_product_attention(
            a, k, v, scale=scale))],
        "sdpa, bool mask (a primitive per op of the fallback)": lambda n: [_chain(
            q, n, lambda a: mx.fast.scaled_dot_product_attention(a, k, v, scale=scale,
                                                                 mask=bool_mask))],
        "reshape (view)": lambda n: [_chain(q, n, lambda a: a.reshape(batch, heads, head_dim)
                                            .reshape(batch, heads, 1, head_dim))],
        "transpose (view)": lambda n: [_chain(q, n, lambda a: a.swapaxes(1, 2).swapaxes(1, 2))],
        f"gather rows [{2 * batch},8,{context}] of a pool": lambda n: [pool[read_rows + i]
                                                                    for i in range(n)],
        f"scatter rows [{2 * batch},8,1] into a pool": scatter_chain,
        f"concatenate two [{batch},8,1,128]": lambda n: [
            mx.concatenate([new_kv[:batch], new_kv[batch:]]) for _ in range(n)],
        "split in two (views)": lambda n: [mx.split(new_kv, 2)[0] for _ in range(n)],
    }
    if double is not None:
        table["custom cuda_kernel (elementwise)"] = lambda n: [_chain(x, n, custom)]
    if large:
        big_w = (mx.random.normal((28672, 4096)) * 0.02).astype(dt)  # [out, in], as a Linear
        big_x = mx.random.normal((batch, 4096)).astype(dt)
        mx.eval(big_w, big_x)
        table[f"matmul [{batch},4096]x[4096,28672], independent"] = lambda n: [
            big_x @ big_w.T for _ in range(n)]
    return table


def _chain(a, n, op):
    for _ in range(n):
        a = op(a)
    return a


def measure(mx, build, count: int, reps: int) -> dict:
    issue, built = [], []
    for rep in range(reps + 1):
        start = time.perf_counter()
        outs = build(count)
        mid = time.perf_counter()
        mx.async_eval(outs)
        end = time.perf_counter()
        mx.eval(outs)
        if rep:
            built.append((mid - start) / count * 1e6)
            issue.append((end - mid) / count * 1e6)
    return {"build_us": round(statistics.median(built), 2),
            "issue_us": round(statistics.median(issue), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=400)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--batch", type=int, default=1, help="rows of a decode step")
    parser.add_argument("--large", action="store_true",
                        help="also products of a Llama-3-8B-sized weight (slow on a CPU)")
    args = parser.parse_args()
    from vllm_metal.device import select_device

    select_device()
    import mlx.core as mx

    settings = {k: v for k, v in os.environ.items() if k.startswith("MLX_")}
    print(f"device {mx.default_device()}, MLX {mx.__version__}, batch {args.batch}, "
          f"settings {settings or 'defaults'}")
    results = {}
    for name, build in kinds(mx, batch=args.batch, large=args.large).items():
        results[name] = measure(mx, build, args.count, args.reps)
        print(f"{name:55s} build {results[name]['build_us']:7.2f} us  "
              f"issue {results[name]['issue_us']:7.2f} us", flush=True)
    print(json.dumps({"settings": settings, "batch": args.batch, "results": results}))


if __name__ == "__main__":
    main()
