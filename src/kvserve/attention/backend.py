"""What an attention backend is: how this step's K/V get into the paged cache, and how q attends over it.

A backend is chosen once per model (attention/selector.py, installed by models/kernel_plan.py) and
each `Attention` layer calls `store_kv` then `attend` on it. The backends are stateless classes
whose two methods are their module's kernel functions (reference.py, cpu.py, triton_attention.py),
so a layer's call reaches the kernel without an extra Python frame.

An int8 / fp8 cache (--kv-cache-dtype) adds its scales as the two trailing arguments of both
methods (`KVCache.scales`); every backend reads every format.

A layer with a sliding window (attention/sliding_window.py) passes it as `sliding_window`: every
backend then lets the query at position i see only the keys at i - W < j <= i. With attention sinks
(attention/attention_sinks.py) the layer also asks for each row's log-sum-exp (`lse`), to merge the
window's softmax with the sinks'; every backend gives it.
"""

from __future__ import annotations

from typing import Protocol

import torch

from kvserve.attention.metadata import AttentionMetadata


class AttentionBackend(Protocol):
    name: str  # "reference" | "cpu" | "triton": what the kernel plan reports

    def store_kv(
        self, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
        *scales: torch.Tensor,
    ) -> None:
        """k_cache/v_cache rows `slot_mapping` = k, v. k, v: [T, Hkv, D]; caches: [blocks, block_size, Hkv, D];
        scales: (k_scale, v_scale) [blocks, Hkv, block_size] of an int8 / fp8 cache."""

    def attend(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
        *scales: torch.Tensor, sliding_window: int | None = None, lse: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """q: [T, Hq, D] attending over the cache as `meta` describes, through the last `sliding_window`
        keys of each query's position only when given -> out [T, Hq, D] (see reference.py); each row's
        log-sum-exp into `lse` [T, Hq] fp32 when given."""
