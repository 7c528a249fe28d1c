"""This rank's KV cache: what vLLM's KV cache manager is told (a spec per layer,
the bytes of a block), then the pools, once it has chosen the number of blocks."""

from dataclasses import dataclass

import torch
from vllm.v1.kv_cache_interface import FullAttentionSpec, MLAAttentionSpec

from vllm_metal.attention.paged import PagedKVCache
from vllm_metal.models.loader import mx_dtype


@dataclass(frozen=True)
class KVLayout:
    block_size: int
    num_kv_heads: int  # this rank's share; 1 under latent attention
    head_size: int
    dtype: torch.dtype
    # Multi-head latent attention: one cached row per token (latent and rotary key,
    # ``head_size`` values), the same on every TP rank; this many of them the latent's.
    latent_width: int | None = None

    @classmethod
    def of(cls, vllm_config) -> "KVLayout":
        model_config = vllm_config.model_config
        tp_size = vllm_config.parallel_config.tensor_parallel_size
        latent = model_config.use_mla
        return cls(
            block_size=vllm_config.cache_config.block_size,
            num_kv_heads=1 if latent else model_config.get_total_num_kv_heads() // tp_size,
            head_size=model_config.get_head_size(),
            dtype=model_config.dtype,
            latent_width=model_config.hf_text_config.kv_lora_rank if latent else None,
        )

    @property
    def entries(self) -> int:
        """Rows a token takes per KV head: a key and a value, or one latent row."""
        return 1 if self.latent_width else 2

    def spec(self, layer_names: list[str]) -> dict[str, FullAttentionSpec]:
        spec_class = MLAAttentionSpec if self.latent_width else FullAttentionSpec
        spec = spec_class(block_size=self.block_size, num_kv_heads=self.num_kv_heads,
                          head_size=self.head_size, dtype=self.dtype)
        return {name: spec for name in layer_names}

    def bytes_per_block(self, num_layers: int) -> int:
        return PagedKVCache.bytes_per_block(num_layers, self.block_size, self.num_kv_heads,
                                            self.head_size, self.dtype.itemsize, self.entries)

    def allocate(self, num_blocks: int, num_layers: int, own_layers: range) -> PagedKVCache:
        """Pools for ``own_layers`` of the model's ``num_layers`` (a pipeline stage's)."""
        return PagedKVCache(num_layers=num_layers, num_blocks=num_blocks,
                            block_size=self.block_size, num_kv_heads=self.num_kv_heads,
                            head_dim=self.head_size, dtype=mx_dtype(self.dtype),
                            own_layers=own_layers, latent_width=self.latent_width)

    def describe(self, num_blocks: int, own_layers: range) -> str:
        values = self.entries * self.num_kv_heads * self.head_size
        return (f"{num_blocks} blocks of {self.block_size} tokens ({num_blocks * self.block_size} "
                f"tokens, {num_blocks * self.bytes_per_block(len(own_layers)) / 1e9:.2f} GB, "
                f"{values} values per token and layer"
                + (": the latent and rotary key of latent attention" if self.latent_width else "")
                + ")")
