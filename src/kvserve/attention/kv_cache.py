"""KVCache: one layer's paged KV cache, as the attention layer hands it to its backend."""

from __future__ import annotations

from typing import NamedTuple

import torch


class KVCache(NamedTuple):
    """K and V, [num_blocks, block_size, num_kv_heads, head_dim] each: in the model's dtype, or int8 /
    fp8 e4m3 values with their scales [num_blocks, num_kv_heads, block_size] fp32 (attention/kv_quant.py).
    A token's slot is block * block_size + offset in both."""

    key: torch.Tensor
    value: torch.Tensor
    key_scale: torch.Tensor | None = None
    value_scale: torch.Tensor | None = None

    @property
    def scales(self) -> tuple[torch.Tensor, ...]:
        """(key_scale, value_scale) of a quantized cache, else (): the trailing arguments of a backend's
        `store_kv` and `attend`."""
        return () if self.key_scale is None else (self.key_scale, self.value_scale)

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the cache holds (a block copy copies a block's rows of each)."""
        return [self.key, self.value, *self.scales]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())
