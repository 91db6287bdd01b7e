"""Attention layer: store this step's K/V in the paged cache, then attend over it, through the
backend the kernel plan installed (attention/backend.py). A layer with a sliding window
(attention/sliding_window.py) attends only to the last `sliding_window` keys of each query."""

from __future__ import annotations

import torch
from torch import nn

from kvserve.attention.backend import AttentionBackend
from kvserve.attention.kv_cache import KVCache
from kvserve.attention.metadata import AttentionMetadata
from kvserve.attention.reference import ReferenceBackend
from kvserve.validation import check, is_int


class Attention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float, sliding_window: int | None = None) -> None:
        super().__init__()
        check(sliding_window is None or (is_int(sliding_window) and sliding_window >= 1), "sliding_window", sliding_window,
              "an integer >= 1 or None")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.sliding_window = sliding_window
        self.backend: AttentionBackend = ReferenceBackend()  # models/kernel_plan.py installs the selected one

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: KVCache,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """q: [T, Hq, D], k/v: [T, Hkv, D]; kv_cache: this layer's (attention/kv_cache.py)."""
        backend = self.backend
        backend.store_kv(k, v, kv_cache.key, kv_cache.value, meta.slot_mapping, *kv_cache.scales)
        return backend.attend(q, kv_cache.key, kv_cache.value, meta, self.scale, *kv_cache.scales,
                              sliding_window=self.sliding_window)
