"""Attention layer: store this step's K/V in the paged cache, then attend over it."""

from __future__ import annotations

import torch
from torch import nn

from kvserve.attention import cpu as cpu_attention
from kvserve.attention.metadata import AttentionMetadata
from kvserve.attention.reference import paged_attention_reference
from kvserve.attention.selector import AttentionFn


class Attention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.backend: AttentionFn = paged_attention_reference  # the loader sets the selected backend

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """q: [T, Hq, D], k/v: [T, Hkv, D]; kv_cache: K and V of shape [blocks, block_size, Hkv, D]."""
        k_cache, v_cache = kv_cache
        if cpu_attention.can_store_kv(k, k_cache) and cpu_attention.can_store_kv(v, v_cache):
            cpu_attention.store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        else:
            k_cache.view(-1, self.num_kv_heads, self.head_dim).index_copy_(0, meta.slot_mapping, k)
            v_cache.view(-1, self.num_kv_heads, self.head_dim).index_copy_(0, meta.slot_mapping, v)
        return self.backend(q, k_cache, v_cache, meta, self.scale)
