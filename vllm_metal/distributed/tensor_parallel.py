"""Tensor parallel: each rank keeps 1/N of every attention and MLP weight.

Column-parallel (output features split by head or by intermediate unit): the q, k
and v projections (also fused ``qkv_proj``), the MLP's gate and up projections
(also fused ``gate_up_proj``) and the same in every MoE expert. Row-parallel
(input features split): ``o_proj``, ``down_proj`` and the experts' down
projections, whose partial outputs are summed across the TP group.
Embeddings, norms, routers and the LM head stay whole on every rank.

Multi-head latent attention (DeepSeek-V3) splits its heads: the query
projection's outputs, the per-head absorbed key and value maps (``embed_q``,
``unembed_out``) and ``o_proj``'s inputs. The latent projection stays whole, so
every rank caches the whole latent. Shared experts split like a dense MLP; the
MoE block's output (routed plus shared) is summed once, so an expert's output
bias (gpt-oss) is divided by the TP size. Attention sinks split by head.

Runs on the lazily loaded model before its weights are evaluated, so a rank
reads and keeps only its own slices. Float and MLX-quantized weights alike:
every parameter of a projection is sliced along the same feature axis.
"""

import mlx.core as mx
import mlx.nn as nn

HEAD_COUNT_ATTRIBUTES = ("n_heads", "n_kv_heads", "num_heads", "num_key_value_heads",
                         "num_attention_heads")


class ShardingError(ValueError):
    pass


class ReducedOutput(nn.Module):
    """Sums a row-parallel module's partial output across the TP group, then adds
    the bias (once)."""

    def __init__(self, inner: nn.Module, all_sum, bias: mx.array | None = None):
        super().__init__()
        self.inner = inner
        self._all_sum = all_sum
        if bias is not None:
            self.bias = bias

    def __call__(self, *args, **kwargs):
        out = self._all_sum(self.inner(*args, **kwargs))
        return out + self.bias if "bias" in self else out


def shard_model(model: nn.Module, tp_rank: int, tp_size: int, all_sum) -> None:
    for index, layer in enumerate(model.layers):
        if layer is None or not hasattr(layer, "self_attn"):
            continue
        where = f"layer {index}"
        _shard_attention(layer.self_attn, tp_rank, tp_size, all_sum, where)
        name = "mlp" if hasattr(layer, "mlp") else "block_sparse_moe"
        setattr(layer, name, _shard_feed_forward(getattr(layer, name), tp_rank, tp_size,
                                                 all_sum, where))


def _shard_attention(attn: nn.Module, rank: int, size: int, all_sum, where: str) -> None:
    heads = {name: getattr(attn, name) for name in HEAD_COUNT_ATTRIBUTES
             if isinstance(getattr(attn, name, None), int)}
    for name, count in heads.items():
        if count % size:
            raise ShardingError(f"{where}: {count} {name} do not split over {size} ranks")
    if hasattr(attn, "kv_a_proj_with_mqa"):
        _split_latent_attention_heads(attn, rank, size, where)
    elif hasattr(attn, "qkv_proj"):
        head_dim = attn.head_dim
        q = attn.n_heads * head_dim
        kv = attn.n_kv_heads * head_dim
        _split_outputs(attn.qkv_proj, rank, size, [q, kv, kv], where)
    else:
        for proj in ("q_proj", "k_proj", "v_proj"):
            _split_outputs(getattr(attn, proj), rank, size, None, where)
    attn.o_proj = _row_parallel(attn.o_proj, rank, size, all_sum, where)
    if "sinks" in attn:  # one attention sink logit per query head
        attn.sinks = _take_share(attn.sinks, 0, rank, size, [attn.sinks.shape[0]],
                                 attn.sinks.shape[0], where)
    for name, count in heads.items():
        setattr(attn, name, count // size)


def _split_latent_attention_heads(attn: nn.Module, rank: int, size: int, where: str) -> None:
    query = attn.q_proj if "q_proj" in attn else attn.q_b_proj
    _split_outputs(query, rank, size, None, where)
    for per_head in (attn.embed_q, attn.unembed_out):  # [heads, out, in] (and scales)
        heads = per_head.weight.shape[0]
        for name in ("weight", "scales", "biases"):
            if name in per_head and per_head[name] is not None:
                per_head[name] = _take_share(per_head[name], 0, rank, size, [heads], heads,
                                             where)


def _shard_feed_forward(ff: nn.Module, rank: int, size: int, all_sum, where: str) -> nn.Module:
    experts = getattr(ff, "switch_mlp", None) or getattr(ff, "experts", None)  # gpt-oss: experts
    if experts is not None:
        # Each expert keeps 1/N of its intermediate units; the routed sum is reduced once.
        if hasattr(ff, "shared_expert"):
            raise ShardingError(f"{where}: MoE blocks with a gated shared expert are not sharded")
        _split_outputs(experts.gate_proj, rank, size, None, where)
        _split_outputs(experts.up_proj, rank, size, None, where)
        _split_inputs(experts.down_proj, rank, size, where)
        if "bias" in experts.down_proj:  # added on every rank, summed over all
            experts.down_proj.bias = experts.down_proj.bias / size
        shared = getattr(ff, "shared_experts", None)
        if shared is not None:
            _split_outputs(shared.gate_proj, rank, size, None, where)
            _split_outputs(shared.up_proj, rank, size, None, where)
            _split_inputs(shared.down_proj, rank, size, where)
        return ReducedOutput(ff, all_sum)
    if hasattr(ff, "gate_up_proj"):
        half = ff.gate_up_proj.weight.shape[0] // 2
        _split_outputs(ff.gate_up_proj, rank, size, [half, half], where)
    else:
        _split_outputs(ff.gate_proj, rank, size, None, where)
        _split_outputs(ff.up_proj, rank, size, None, where)
    ff.down_proj = _row_parallel(ff.down_proj, rank, size, all_sum, where)
    return ff


def _row_parallel(proj: nn.Module, rank: int, size: int, all_sum, where: str) -> nn.Module:
    bias = proj.bias if "bias" in proj else None
    if bias is not None:
        del proj["bias"]
    _split_inputs(proj, rank, size, where)
    return ReducedOutput(proj, all_sum, bias)


def _split_outputs(proj: nn.Module, rank: int, size: int, segments, where: str) -> None:
    """Keep this rank's share of the output features (of each fused segment)."""
    out_axis = proj.weight.ndim - 2  # [out, in] or, for experts, [E, out, in]
    out_features = proj.weight.shape[out_axis]
    for name in ("weight", "scales", "biases", "bias"):
        if name in proj:
            axis = out_axis if name != "bias" else proj[name].ndim - 1
            proj[name] = _take_share(proj[name], axis, rank, size, segments or [out_features],
                                     out_features, where)


def _split_inputs(proj: nn.Module, rank: int, size: int, where: str) -> None:
    """Keep this rank's share of the input features (packed quantized columns and
    their group scales alike)."""
    group_size = getattr(proj, "group_size", None)
    in_features = proj.weight.shape[-1] * (32 // proj.bits if group_size else 1)
    if in_features % size or (group_size and (in_features // size) % group_size):
        raise ShardingError(
            f"{where}: {in_features} input features do not split over {size} ranks"
            + (f" in whole quantization groups of {group_size}" if group_size else "")
        )
    for name in ("weight", "scales", "biases"):
        if name in proj:
            proj[name] = _take_share(proj[name], -1, rank, size, [proj[name].shape[-1]],
                                     proj[name].shape[-1], where)


def _take_share(array: mx.array, axis: int, rank: int, size: int, segments: list[int],
                total: int, where: str) -> mx.array:
    """Rank's 1/size of each segment along ``axis``, segments given in units of
    ``total`` (rescaled when the array is packed or grouped along that axis)."""
    length = array.shape[axis]
    if length % total == 0:
        scale_num, scale_den = length // total, 1
    elif total % length == 0:
        scale_num, scale_den = 1, total // length
    else:
        raise ShardingError(f"{where}: cannot line up an array of {length} with {total} features")
    pieces, start = [], 0
    for segment in segments:
        seg = segment * scale_num // scale_den
        if seg % size:
            raise ShardingError(f"{where}: {segment} features do not split over {size} ranks")
        share = seg // size
        index = [slice(None)] * array.ndim
        index[axis] = slice(start + rank * share, start + (rank + 1) * share)
        pieces.append(array[tuple(index)])
        start += seg
    shard = pieces[0] if len(pieces) == 1 else mx.concatenate(pieces, axis=axis)
    # A copy (a slice is a view): the full tensor is freed once this is evaluated.
    return shard * mx.array(1, dtype=shard.dtype)
