"""A decoder layer's decode step in six kernels (Llama, Mistral, Qwen2, Qwen3).

mlx-lm's decoder layer issues about 25 primitives per decode step even with
fused projections and the paged attention kernel; on MLX's CUDA build the
host's cost of issuing them, not the device, limits a small model's step
(``benchmarks/issue_cost.py``). For the layers of mlx-lm's Llama, Qwen2 and
Qwen3 modules (Mistral runs on Llama's), whose step this module knows, a
compiled decode step runs:

1. the input norm and the fused q/k/v projection (``gemv``, with its norm);
2. the whole attention (``attention.fused_decode``: q/k norms, rotary
   embedding, the KV write, attention over the paged context);
3. the output projection plus the residual (``gemv``, with its residual);
4. the post-attention norm and the fused gate/up projection;
5. the SwiGLU activation (``swiglu``);
6. the down projection plus the residual.

Products ``gemv.covers`` leaves out (weights of ``gemv.LARGE_WEIGHT`` or more, rows
above ``gemv.MAX_ROWS``, or above ``gemv.TENSOR_MAX_ROWS`` on tensor cores) take
MLX's norm, matmul and add.
``route_blocks`` swaps a covered layer's class for a subclass (parameters
unchanged); every other step (prefill chunks, ``--enforce-eager``, padding
windows) runs mlx-lm's own code. Each kernel's reference in MLX's operations
stands in for it in the tests off CUDA.
"""

import functools

import mlx.core as mx
import mlx.nn as nn

from vllm_metal import envs
from vllm_metal.attention import fused_decode
from vllm_metal.device import cuda_feature
from vllm_metal.models import gemv

# mlx-lm modules whose TransformerBlock computes, per step: x + attn(norm(x)), then
# h + mlp(norm(h)), with attention of (optional) q/k RMS norms and a rotary module,
# and a SwiGLU MLP.
KNOWN_BLOCKS = {"mlx_lm.models.llama", "mlx_lm.models.qwen2", "mlx_lm.models.qwen3"}

_SWIGLU_SOURCE = """
    const int width = gu_shape[gu_ndim - 1] / 2;
    long rows = 1;
    for (int i = 0; i < gu_ndim - 1; ++i) rows *= gu_shape[i];
    const long idx = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= rows * width) return;
    const long row = idx / width;
    const int i = idx % width;
    const float gate = static_cast<float>(gu[row * 2 * width + i]);
    const float up = static_cast<float>(gu[row * 2 * width + width + i]);
    out[idx] = static_cast<T>(gate / (1.f + expf(-gate)) * up);
"""


def available() -> bool:
    return cuda_feature("VLLM_METAL_FUSED_DECODE_BLOCK", envs.VLLM_METAL_FUSED_DECODE_BLOCK)


@functools.cache
def _swiglu_kernel():
    return mx.fast.cuda_kernel(name="vllm_metal_swiglu", input_names=["gu"],
                               output_names=["out"], source=_SWIGLU_SOURCE)


def swiglu(gu: mx.array) -> mx.array:
    """``gu`` [..., 2I] (gate, then up) -> silu(gate) * up [..., I], one kernel."""
    width = gu.shape[-1] // 2
    threads = 256
    total = gu.size // 2
    return _swiglu_kernel()(
        inputs=[gu], template=[("T", gu.dtype)], grid=(-(-total // threads) * threads, 1, 1),
        threadgroup=(threads, 1, 1), output_shapes=[(*gu.shape[:-1], width)],
        output_dtypes=[gu.dtype])[0]


def reference_swiglu(gu: mx.array) -> mx.array:
    gate, up = mx.split(gu, 2, axis=-1)
    return nn.silu(gate) * up


def rotary_frequencies(rope, head_dim: int) -> tuple[mx.array, bool] | None:
    """Each rotary pair's angle per position, and whether pairs are adjacent
    (traditional) or half a head apart, of mlx-lm's rotary module ``rope``: read
    off the module at position 1, then checked against it at other positions.
    None where the module does not compute such a rotation (scaled magnitudes,
    partial rotary dimensions, angles not linear in the position)."""
    if getattr(rope, "dims", head_dim) != head_dim:
        return None
    half = head_dim // 2
    probe = mx.concatenate([mx.ones((half,)), mx.zeros((half,))]).reshape(1, 1, 1, head_dim)
    for traditional in (False, True):
        x = probe if not traditional else mx.stack(
            [mx.ones((half,)), mx.zeros((half,))], axis=-1).reshape(1, 1, 1, head_dim)
        try:
            turned = rope(x, offset=1).astype(mx.float32).reshape(-1)
        except (TypeError, ValueError):
            return None
        cos = turned[0::2] if traditional else turned[:half]
        sin = turned[1::2] if traditional else turned[half:]
        inv_freq = mx.arctan2(sin, cos).astype(mx.float32)
        if _matches(rope, inv_freq, traditional, head_dim):
            return inv_freq, traditional
    return None


def _matches(rope, inv_freq, traditional: bool, head_dim: int) -> bool:
    x = mx.random.normal((1, 2, 1, head_dim), key=mx.random.key(0))
    for position in (1, 7, 300, 4000):
        want = rope(x, offset=position).astype(mx.float32)
        got = fused_decode.rotate(x, mx.array([position]), inv_freq, traditional)
        if not mx.allclose(got, want, atol=2e-3, rtol=2e-3).item():
            return False
    return True


def _plain_linear(layer) -> bool:
    return isinstance(layer, nn.Linear) and not isinstance(layer, nn.QuantizedLinear)


def block_covered(block) -> bool:
    """Whether ``block`` is one of the layers this module knows, with its projections
    fused and unquantized, RMS norms and a head size the kernel takes."""
    cls = type(block)
    if cls.__name__ != "TransformerBlock" or cls.__module__ not in KNOWN_BLOCKS:
        return False
    attention, mlp = block.get("self_attn"), block.get("mlp")
    if attention is None or mlp is None or "qkv_fused" not in attention \
            or "gate_up_fused" not in mlp:
        return False
    layers = [attention.qkv_fused.layer, attention.o_proj, mlp.gate_up_fused.layer, mlp.down_proj]
    norms = [block.input_layernorm, block.post_attention_layernorm]
    if "q_norm" in attention:
        norms += [attention.q_norm, attention.k_norm]
    head_dim = attention.o_proj.weight.shape[1] // attention.n_heads
    return (all(_plain_linear(layer) for layer in layers)
            and all(isinstance(norm, nn.RMSNorm) for norm in norms)
            and head_dim % 32 == 0 and head_dim <= 256)


class FusedDecodeStep:
    """Mixed into a covered layer's class: its compiled decode steps in six kernels."""

    def __call__(self, x, mask=None, cache=None):
        if not self._fused_step_covers(x, mask, cache):
            return super().__call__(x, mask, cache)
        attention, mlp = self.self_attn, self.mlp
        plan = cache.plan
        norm = self.input_layernorm
        qkv = _linear(x, attention.qkv_fused.layer, (norm.weight, norm.eps))
        q_norm = attention.get("q_norm")
        in_place = plan.write_in_place
        result = fused_decode.fused_decode_attention(
            qkv, cache.pools[cache.layer], plan.offsets, plan.write_rows, plan.read_rows,
            attention.n_heads, attention.n_kv_heads, attention.scale, self._inv_freq,
            self._traditional, None if q_norm is None else q_norm.weight,
            None if q_norm is None else attention.k_norm.weight,
            0.0 if q_norm is None else q_norm.eps, write=in_place,
            warps=fused_decode.warps_for(x.shape[0], attention.n_heads))
        if not in_place:
            result, keys, values = result
            cache._write(keys, values)
        h = _linear(result, attention.o_proj, residual=x)
        norm = self.post_attention_layernorm
        gu = _linear(h, mlp.gate_up_fused.layer, (norm.weight, norm.eps))
        return _linear(swiglu(gu), mlp.down_proj, residual=h)

    def _fused_step_covers(self, x, mask, cache) -> bool:
        from vllm_metal.attention.decode_graph import StepPlan

        plan = getattr(cache, "plan", None)
        if not isinstance(plan, StepPlan) or x.shape[1] != 1:
            return False  # only the compiled decode step
        pool = cache.pools[cache.layer]
        known, window = plan.window_of(mask)
        return (known and window is None and pool is not None and pool.ndim == 2
                and x.dtype == pool.dtype == self.input_layernorm.weight.dtype)


def _linear(x, layer, norm=None, residual=None):
    bias = layer.get("bias")
    if gemv.available() and gemv.covers(x, layer.weight):
        return gemv.small_batch_linear(x, layer.weight, bias, norm, residual)
    return gemv.reference_linear(x, layer.weight, bias, norm, residual)


@functools.cache
def _fused_class(cls):
    return type(f"FusedDecode{cls.__name__}", (FusedDecodeStep, cls), {})


def route_blocks(model: nn.Module) -> int:
    """Give each covered decoder layer of ``model`` the fused decode step where the
    kernels are available; returns how many."""
    if not available():
        return 0
    routed = 0
    for _, module in model.named_modules():
        if not block_covered(module):
            continue
        attention = module.self_attn
        head_dim = attention.o_proj.weight.shape[1] // attention.n_heads
        rotary = rotary_frequencies(attention.rope, head_dim)
        if rotary is None:
            continue
        module.__class__ = _fused_class(type(module))
        # Plain attributes: not parameters, so the parameter tree stays mlx-lm's.
        object.__setattr__(module, "_inv_freq", rotary[0])
        object.__setattr__(module, "_traditional", rotary[1])
        routed += 1
    return routed
