"""Where mlx-lm's attention meets the paged decode kernel (``decode_kernel``).

mlx-lm's models call ``mlx_lm.models.base.scaled_dot_product_attention(queries,
keys, values, cache, scale, mask, sinks)``, a name each model module imports.
When the kernel is available, ``route_attention`` rebinds that name in the
loaded model's modules to ``attention``: for a layer cache of this plugin in a
decode step that the kernel covers, the kernel answers from the pools (the
gathered ``keys``/``values`` are then never computed: MLX evaluates only what an
output needs); everything else goes to mlx-lm's function unchanged, mlx-lm's own
caches included. This module is the only contact with that part of mlx-lm.
"""

import sys

import mlx.nn as nn

from vllm_metal.attention import decode_kernel


def _mlx_lm_attention():
    from mlx_lm.models import base

    return base.scaled_dot_product_attention


def attention(queries, keys, values, cache, scale, mask, sinks=None):
    decode = getattr(cache, "decode_attention", None)
    if decode is not None:
        out = decode(queries, scale, mask, sinks)
        if out is not None:
            return out
    return _mlx_lm_attention()(queries, keys, values, cache=cache, scale=scale, mask=mask,
                               sinks=sinks)


def route_attention(model: nn.Module) -> bool:
    """Send ``model``'s attention through ``attention`` where the kernel is available;
    returns whether it did."""
    if not decode_kernel.available():
        return False
    original = _mlx_lm_attention()
    routed = False
    for cls in type(model).__mro__:
        module = sys.modules.get(cls.__module__)
        for name in _model_modules(module):
            target = sys.modules[name]
            if getattr(target, "scaled_dot_product_attention", None) is original:
                target.scaled_dot_product_attention = attention
                routed = True
            elif getattr(target, "scaled_dot_product_attention", None) is attention:
                routed = True
    return routed


def _model_modules(module) -> list[str]:
    """``module`` and the mlx-lm model modules it imports classes from."""
    if module is None:
        return []
    names = {module.__name__}
    for value in vars(module).values():
        owner = getattr(value, "__module__", None)
        if isinstance(value, type) and owner and owner.startswith("mlx_lm.models."):
            names.add(owner)
    names.discard("mlx_lm.models.base")  # the original stays where it is defined
    return [n for n in names if n in sys.modules]
