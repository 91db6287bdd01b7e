"""Attention layer: store this step's K/V in the paged cache, then attend over it, through the
backend the kernel plan installed (attention/backend.py). A layer with a sliding window
(attention/sliding_window.py) attends only to the last `sliding_window` keys of each query; one with
attention sinks (attention/attention_sinks.py) to the first `streaming.sinks` keys as well."""

from __future__ import annotations

import torch
from torch import nn

from kvserve.attention import attention_sinks
from kvserve.attention.attention_sinks import StreamingWindow
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
        self.streaming: StreamingWindow | None = None  # set by use_streaming
        self.backend: AttentionBackend = ReferenceBackend()  # models/kernel_plan.py installs the selected one

    def use_streaming(self, streaming: StreamingWindow) -> None:
        """Attend to `streaming.sinks` sinks and a window of `streaming.window` keys, whatever the model's own window."""
        self.streaming = streaming
        self.sliding_window = streaming.window

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: KVCache,
        meta: AttentionMetadata,
        q_sink: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """q: [T, Hq, D], k/v: [T, Hkv, D]; kv_cache: this layer's (attention/kv_cache.py). With attention sinks,
        `q_sink` is the query at its position within the cache (default: q), which scores the sinks."""
        backend = self.backend
        backend.store_kv(k, v, kv_cache.key, kv_cache.value, meta.slot_mapping, *kv_cache.scales)
        streaming = self.streaming
        if streaming is None or streaming.sinks == 0:
            return backend.attend(q, kv_cache.key, kv_cache.value, meta, self.scale, *kv_cache.scales,
                                  sliding_window=self.sliding_window)
        sinks = attention_sinks.sink_attention(q if q_sink is None else q_sink, kv_cache.key, kv_cache.value, meta,
                                               self.scale, streaming, *kv_cache.scales)
        lse = None if sinks is None else torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
        out = backend.attend(q, kv_cache.key, kv_cache.value, meta, self.scale, *kv_cache.scales,
                             sliding_window=self.sliding_window, lse=lse)
        return out if sinks is None else attention_sinks.merge(out, lse, *sinks)
