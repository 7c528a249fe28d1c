"""The model as one rank runs it: loaded, cut to the rank's share (its pipeline
stage, its tensor shard), projections fused, each layer routed to the kernels
that cover it."""

import logging
from dataclasses import dataclass

from vllm_metal import envs
from vllm_metal.attention.dispatch import route_attention
from vllm_metal.models import decode_block, gemv
from vllm_metal.models.adapter import CausalLM
from vllm_metal.models.fusion import fuse_projections
from vllm_metal.models.loader import load_model, mx_dtype
from vllm_metal.models.registry import GROUPED_SCORE_MASK
from vllm_metal.models.windows import layer_windows, use_layer_windows

logger = logging.getLogger("vllm.metal")


@dataclass
class RankModel:
    model: CausalLM
    stage_layers: range  # the decoder layers this rank runs
    handoff: object | None  # pipeline parallelism: hands the stage's activations on
    adapters: object | None  # vllm_metal.lora.Adapters under --enable-lora
    grouped_mask: bool  # one score mask per KV head group (GROUPED_SCORE_MASK)
    layer_windows: list[int | None]  # each layer's sliding window, None for full attention
    paged_kernel: bool  # decode attention by vllm_metal.attention.decode_kernel
    fused_blocks: int  # decoder layers whose decode step is vllm_metal.models.decode_block's


def load_rank_model(vllm_config, parallel, tp_rank: int = 0, pp_rank: int = 0) -> RankModel:
    """``parallel``: the rank's ModelParallel, or None for one rank."""
    from vllm_metal.models.hub import checkpoint_dir

    model_config = vllm_config.model_config
    hf_config = model_config.hf_text_config
    dtype = mx_dtype(model_config.dtype)
    lora_config = vllm_config.lora_config
    stage = {"layers": None, "handoff": None}

    def prepare(model) -> None:
        """Before the weights are read: this rank's part of the model, then its
        projections fused (LoRA's adapters attach to each projection: kept apart)."""
        if parallel is not None:
            stage["layers"], stage["handoff"] = _partition(model, vllm_config, parallel,
                                                           tp_rank, pp_rank)
        if envs.VLLM_METAL_FUSE_PROJECTIONS and lora_config is None:
            fuse_projections(model)

    model = CausalLM(load_model(checkpoint_dir(vllm_config), model_config.dtype, prepare))
    adapters = None
    if lora_config is not None:
        from vllm_metal.lora import Adapters

        adapters = Adapters(model.model, lora_config, model_config.max_model_len, dtype)
    arch = (model_config.architectures or [""])[0]
    windows = layer_windows(arch, hf_config)
    use_layer_windows(model.backbone, windows)
    if any(windows):
        logger.info("Sliding windows per layer: %s", windows)
    return RankModel(
        model=model,
        stage_layers=range(model.num_layers) if stage["layers"] is None else stage["layers"],
        handoff=stage["handoff"],
        adapters=adapters,
        grouped_mask=(arch in GROUPED_SCORE_MASK and model_config.get_total_num_kv_heads()
                      != hf_config.num_attention_heads),
        layer_windows=windows,
        paged_kernel=_route_kernels(model),
        fused_blocks=_route_decode_blocks(model, alone=parallel is None and adapters is None),
    )


def _partition(model, vllm_config, parallel, tp_rank: int, pp_rank: int):
    """This rank's part of the model: its tensor shard, its pipeline stage.
    Returns the stage's layers and its handoff (None, None for one stage)."""
    from vllm_metal.distributed.pipeline import split_stages
    from vllm_metal.distributed.tensor_parallel import shard_model

    parallel_config = vllm_config.parallel_config
    tp_size, pp_size = parallel_config.tensor_parallel_size, parallel_config.pipeline_parallel_size
    hf_config = vllm_config.model_config.hf_text_config
    if tp_size > 1:
        shard_model(model, tp_rank, tp_size, parallel.tp_all_sum)
    if pp_size == 1:
        return None, None
    return split_stages(model, pp_rank, pp_size, parallel,
                        mx_dtype(vllm_config.model_config.dtype), hf_config.hidden_size,
                        bool(getattr(hf_config, "tie_word_embeddings", False)))


def _route_kernels(model: CausalLM) -> bool:
    """The linear layers and the decode attention to their kernels where they cover
    them; returns whether decode attention reads the paged cache in a kernel."""
    paged_kernel = route_attention(model.model)
    if gemv.route_linears(model.model):
        logger.info("Linear layers of weights under %d MiB at up to %d rows: one "
                    "matrix-vector kernel each%s (VLLM_METAL_GEMV_KERNEL=0: MLX's matmul)",
                    gemv.LARGE_WEIGHT // 2**20, gemv.MAX_ROWS,
                    f", up to {gemv.TENSOR_MAX_ROWS} in half precision on tensor cores "
                    "(VLLM_METAL_GEMV_TENSOR_CORES=0: off)" if gemv.tensor_cores() else "")
    if paged_kernel:
        logger.info("Decode attention: one kernel per layer reading the paged KV cache "
                    "(VLLM_METAL_PAGED_ATTENTION_KERNEL=0: MLX's attention on the gathered context)")
    return paged_kernel


def _route_decode_blocks(model: CausalLM, alone: bool) -> int:
    """Decoder layers whose compiled decode step runs in six kernels (``alone``: one
    rank, no LoRA); VLLM_METAL_FUSED_DECODE_BLOCK=1 with none covered stops startup."""
    fused = decode_block.route_blocks(model.model) if alone else 0
    if fused:
        logger.info("Decode steps: %d decoder layers fused, in six kernels each where "
                    "their weights are under %d MiB (VLLM_METAL_FUSED_DECODE_BLOCK=0: "
                    "mlx-lm's layers)", fused, gemv.LARGE_WEIGHT // 2**20)
    elif envs.VLLM_METAL_FUSED_DECODE_BLOCK == "1":
        raise RuntimeError(
            "VLLM_METAL_FUSED_DECODE_BLOCK=1, but no decoder layer of this model is covered "
            "(Llama, Mistral, Qwen2 or Qwen3 layers, unquantized, projections fused, one rank, "
            "no LoRA): unset VLLM_METAL_FUSED_DECODE_BLOCK")
    return fused
