"""What an input written by the host costs the device's first kernel to read it.

A decode step hands the device a few small arrays made on the host each step
(positions, pool rows, tokens). On MLX's CUDA build an array made from host data
lives in managed memory: its pages move to the device when a kernel first reads
them. This times, per step of ``--inputs`` small int32 arrays each read by one
kernel: the arrays made on the host one by one, packed into one host array and
sliced, and made on the device (no host data). A B C A B C, medians.

    python -m benchmarks.host_inputs [--inputs 4] [--size 2048] [--steps 300]
"""

import argparse
import statistics
import time

import mlx.core as mx
import numpy as np


def run(make, inputs: int, steps: int) -> float:
    """Microseconds per step: make the step's inputs, then one kernel on each."""
    mx.synchronize()
    start = time.perf_counter()
    for step in range(steps):
        mx.eval([x * 3 + step for x in make(step)])
    mx.synchronize()
    return 1e6 * (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", type=int, default=4)
    parser.add_argument("--size", type=int, default=2048, help="int32 values per input")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    k, n = args.inputs, args.size
    base = mx.arange(n, dtype=mx.int32)
    mx.eval(base)

    def separate(step):
        return [mx.array(np.full(n, step + i, np.int32)) for i in range(k)]

    def packed(step):
        whole = mx.array(np.full(k * n, step, np.int32))
        return [whole[i * n:(i + 1) * n] for i in range(k)]

    def on_device(step):
        return [base + (step + i) for i in range(k)]

    variants = {"separate host arrays": separate, "one packed host array": packed,
                "made on the device": on_device}
    for make in variants.values():  # first calls: kernels compiled, buffers cached
        run(make, k, 20)
    times = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, make in variants.items():
            times[name].append(run(make, k, args.steps))
    print(f"device {mx.default_device()}, {k} inputs of {n} int32, {args.steps} steps, "
          f"{args.rounds} rounds (median us per step)")
    print("| inputs made | us per step | rounds |")
    print("| --- | --- | --- |")
    for name, got in times.items():
        print(f"| {name} | {statistics.median(got):.1f} | {', '.join(f'{t:.1f}' for t in got)} |")


if __name__ == "__main__":
    main()
