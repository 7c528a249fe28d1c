"""The host's cost of one decode step, the plugin's paged graph against mlx-lm's
dense-cache graph on the same weights: Python graph building, then ``mx.async_eval``
(MLX's own scheduling and kernel launches), each the median over steps. The
plugin's model is prepared as the engine prepares it (projections fused; on
CUDA, decode attention by the paged kernel); its step is measured eager
(``--enforce-eager``, and every prefill chunk) and as the compiled decode graph
the engine runs by default.

    python -m benchmarks.host_cost MODEL_DIR [--batch 1 8] [--steps 40] [--context 64]
"""

import argparse
import collections
import json
import os
import re
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def timed_steps(build, steps: int) -> dict:
    import mlx.core as mx

    builds, issues, totals = [], [], []
    for _ in range(steps):
        start = time.perf_counter()
        out = build()
        built = time.perf_counter()
        mx.async_eval(out)
        issued = time.perf_counter()
        out.tolist()
        builds.append(built - start)
        issues.append(issued - built)
        totals.append(time.perf_counter() - start)
    return {k: round(1e3 * statistics.median(v), 3)
            for k, v in (("build_ms", builds), ("async_eval_ms", issues), ("step_ms", totals))}


def graph_ops(out) -> dict:
    """Primitives in the graph that computes ``out``, by name (MLX's DOT export).
    Evaluates ``out`` then, so the next step's graph does not include this one."""
    import mlx.core as mx

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "graph.dot")
        mx.export_to_dot(str(path), out)
        names = re.findall(r'label ="([A-Za-z0-9_]+)', path.read_text())
    mx.eval(out)
    counts = collections.Counter(names)
    return {"total": sum(counts.values()), **dict(counts.most_common())}


def decode_steps(model_dir: str, batch: int, steps: int, context: int = 64,
                 variants: dict[str, dict[str, str]] | None = None) -> tuple[dict, dict]:
    """One decode step of each kind, as functions returning the step's greedy
    tokens (unevaluated): ``mlx_lm`` (its dense cache), ``plugin`` (the eager
    paged graph), ``plugin_compiled`` (the engine's compiled decode step, writing
    in place where ``VLLM_METAL_KV_WRITE_IN_PLACE`` says so, its layers fused where
    ``VLLM_METAL_FUSED_DECODE_BLOCK`` says so), and ``plugin_compiled:NAME`` for each
    of ``variants`` (the compiled step traced with those settings in the
    environment: settings read when a step is traced, such as the kernels'
    choices); each may run ``steps`` times, twice. Also returns what the plugin's
    steps run: the paged attention kernel (``paged_kernel``), how many fused
    layers, in-place writes."""
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.models.cache import make_prompt_cache

    from vllm_metal.attention.decode_graph import DecodeGraphs
    from vllm_metal.attention.dispatch import route_attention
    from vllm_metal.attention.paged import BatchPlan, PagedKVCache
    from vllm_metal.models.adapter import CausalLM
    from vllm_metal.models.fusion import fuse_projections
    from vllm_metal.models.decode_block import route_blocks
    from vllm_metal.models.gemv import route_linears

    model, _ = load(model_dir)
    plugin_model, _ = load(model_dir)
    fuse_projections(plugin_model)
    mx.eval(plugin_model.parameters())  # as the engine's loader does: the fused weights, once
    use_kernel = route_attention(plugin_model)
    route_linears(plugin_model)
    fused_blocks = route_blocks(plugin_model)  # where VLLM_METAL_FUSED_DECODE_BLOCK says so
    args = model.args
    kv_heads = args.num_key_value_heads
    head_dim = getattr(args, "head_dim", None) or args.hidden_size // args.num_attention_heads
    dtype = model.model.embed_tokens.weight.dtype

    cache = make_prompt_cache(model)
    mx.eval(model(mx.zeros((batch, context), mx.int32), cache=cache))
    token = mx.zeros((batch,), mx.int32)

    def mlx_lm_step():
        nonlocal token
        token = mx.argmax(model(token[:, None], cache=cache)[:, -1], axis=-1)
        return token

    block_size = 16
    variants = variants or {}
    runs = 2 * (2 + len(variants))  # two runs of each of the plugin's steps
    blocks_per_seq = -(-(context + runs * steps + 16) // block_size)
    pools = PagedKVCache(len(model.layers), 1 + batch * blocks_per_seq, block_size, kv_heads,
                         head_dim, dtype)
    tables = 1 + np.arange(batch * blocks_per_seq).reshape(batch, blocks_per_seq)
    lm = CausalLM(plugin_model)
    position = context

    def plugin_step():
        nonlocal position
        plan = BatchPlan.build(tables, [position] * batch, [1] * batch, block_size, kv_heads)
        plan.use_kernel = use_kernel
        position += 1
        hidden = lm.hidden_states(mx.zeros((batch, 1), mx.int32), pools.layer_views(plan))
        return mx.argmax(lm.logits(hidden[:, -1]), axis=-1)

    def compiled_step_with(settings: dict[str, str]):
        graphs = DecodeGraphs(lm, pools, [None] * len(model.layers), grouped_mask=False,
                              use_kernel=use_kernel, fused_blocks=fused_blocks > 0)

        def compiled_step():
            nonlocal position
            positions = np.full(batch, position)
            position += 1
            saved = {name: os.environ.get(name) for name in settings}
            os.environ.update(settings)  # read where the step is traced (its first call)
            try:
                logits = graphs.logits(mx.zeros((batch, 1), mx.int32), tables, positions)
            finally:
                for name, value in saved.items():
                    if value is None:
                        os.environ.pop(name)
                    else:
                        os.environ[name] = value
            return mx.argmax(logits, axis=-1)

        return compiled_step, graphs

    compiled_step, graphs = compiled_step_with({})
    steps_of = {"mlx_lm": mlx_lm_step, "plugin": plugin_step, "plugin_compiled": compiled_step}
    for name, settings in variants.items():
        steps_of[f"plugin_compiled:{name}"] = compiled_step_with(settings)[0]
    return steps_of, {
                "paged_kernel": use_kernel, "fused_blocks": fused_blocks,
                "writes_in_place": graphs.writes_in_place}


def measure(model_dir: str, batch: int, steps: int, context: int = 64) -> dict:
    step_of, facts = decode_steps(model_dir, batch, steps, context)
    for step in step_of.values():
        timed_steps(step, 3)
    result = {"batch": batch, **facts,
              **{f"ops_{name}": graph_ops(step()) for name, step in step_of.items()}}
    for key, name in (("mlx_lm", "mlx_lm"), ("plugin", "plugin"),
                      ("plugin_compiled", "plugin_compiled"), ("mlx_lm_again", "mlx_lm")):
        result[key] = timed_steps(step_of[name], steps)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--context", type=int, default=64, help="tokens of context per request")
    args = parser.parse_args()
    from vllm_metal.device import keep_heap_between_steps, select_device

    select_device()
    keep_heap_between_steps()  # as the engine's worker does
    for batch in args.batch:
        print(json.dumps(measure(args.model, batch, args.steps, args.context)), flush=True)


if __name__ == "__main__":
    main()
