"""Embedding: the token embedding table, dense or kept in GGUF blocks.

A GGUF often stores the table in Q8_0 or Q6_K (and ties the LM head to it). Kept
in its blocks, a lookup dequantizes only the rows of the step's tokens
(`cpu_quant.dequantize_rows`), and a tied LM head multiplies on the same blocks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kvserve.layers import cpu_quant
from kvserve.layers.packed_weight import PackedWeight


class Embedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim), requires_grad=False)
        self.dtype = self.weight.dtype  # of the rows a lookup returns, also once the table is packed
        self.packed: PackedWeight | None = None

    def load_packed(self, packed: PackedWeight, shard: int | None = None) -> None:
        """Keep the table in GGUF blocks; the dense table is released."""
        if (packed.out_features, packed.in_features) != (self.num_embeddings, self.embedding_dim):
            raise ValueError(f"shape mismatch: expects {self.num_embeddings} x {self.embedding_dim}, checkpoint has "
                             f"{packed.out_features} x {packed.in_features}")
        self.packed = packed
        self.weight = nn.Parameter(torch.empty(0, dtype=self.dtype), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        packed = self.packed
        if packed is None:
            return F.embedding(ids, self.weight)
        return cpu_quant.dequantize_rows(packed.blocks, packed.format, self.embedding_dim, ids, self.dtype)
