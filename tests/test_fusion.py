"""Projections fused at load (``models/fusion.py``): the fused model computes what
the separate projections did, for float, quantized and biased layers, holds each
weight once, and leaves apart what cannot be fused."""

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten

from vllm_metal.models.fusion import FusedProjection, ProjectionPart, fuse_projections


def load(path):
    import torch

    from vllm_metal.models.loader import load_model

    return load_model(path, torch.float32)


def parameter_count(model) -> int:
    return sum(v.size for _, v in tree_flatten(model.parameters()))


@pytest.mark.parametrize("arch, quantize", [("qwen3", False), ("llama", True),
                                            ("gpt_oss", False), ("gemma2", False)])
def test_fused_model_computes_the_same(arch, quantize, tiny_model):
    model = load(tiny_model(arch))
    if quantize:
        nn.quantize(model, group_size=32, bits=4)
    tokens = mx.array([[3, 17, 40, 9, 88, 5], [7, 7, 1, 200, 31, 2]])
    before, count = model(tokens), parameter_count(model)
    groups = fuse_projections(model)
    assert groups >= model.args.num_hidden_layers
    assert parameter_count(model) == count
    after = model(tokens)
    assert mx.allclose(after, before, atol=1e-5, rtol=1e-5).item()


def test_each_group_is_fused_once_and_called_once(tiny_model):
    model = load(tiny_model("qwen3"))
    fuse_projections(model)
    attn = model.model.layers[0].self_attn
    assert isinstance(attn.q_proj, ProjectionPart) and isinstance(attn.qkv_fused, FusedProjection)
    calls = []
    layer = attn.qkv_fused.layer
    attn.qkv_fused.layer = lambda x: calls.append(x) or layer(x)
    x = mx.ones((1, 2, model.args.hidden_size))
    q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
    assert len(calls) == 1
    assert (q.shape[-1], k.shape[-1], v.shape[-1]) == (
        model.args.num_attention_heads * model.args.head_dim,
        model.args.num_key_value_heads * model.args.head_dim,
        model.args.num_key_value_heads * model.args.head_dim)
    attn.q_proj(x)  # a new call with the same array: computed again, not a stale part
    assert len(calls) == 2


def test_layers_that_differ_stay_apart():
    module = nn.Module()
    module.q_proj = nn.Linear(8, 8, bias=False)
    module.k_proj = nn.Linear(8, 4, bias=True)  # a bias the others lack
    module.v_proj = nn.Linear(8, 4, bias=False)
    module.gate_proj = nn.Linear(8, 16, bias=False)
    module.up_proj = nn.QuantizedLinear(32, 16, bias=False, group_size=32, bits=4)
    assert fuse_projections(module) == 0
    assert isinstance(module.q_proj, nn.Linear) and isinstance(module.gate_proj, nn.Linear)
