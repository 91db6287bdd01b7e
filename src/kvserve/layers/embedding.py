"""Embedding: the token embedding table, dense or kept in GGUF blocks, whole or split by vocabulary.

A GGUF often stores the table in Q8_0 or Q6_K (and ties the LM head to it). Kept
in its blocks, a lookup dequantizes only the rows of the step's tokens
(`cpu_quant.dequantize_rows`), and a tied LM head multiplies on the same blocks.

Under tensor parallelism each rank keeps a slice of the vocabulary's rows (vLLM's
VocabParallelEmbedding): it looks up the ids in its slice, writes zeros for the
others, and one all-reduce assembles every row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kvserve.distributed.communication import all_reduce
from kvserve.distributed.parallel_state import SINGLE, ParallelContext
from kvserve.layers import cpu_quant
from kvserve.layers.linear import load_vocab_rows, vocab_shard
from kvserve.layers.packed_weight import PackedWeight


class Embedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int, parallel: ParallelContext = SINGLE) -> None:
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.parallel = parallel
        self.vocab_start, rows = vocab_shard(num_embeddings, parallel)
        self.weight = nn.Parameter(torch.empty(rows, embedding_dim), requires_grad=False)
        if parallel.tp_size > 1:
            self.weight.weight_loader = self._load_weight
        self.dtype = self.weight.dtype  # of the rows a lookup returns, also once the table is packed
        self.packed: PackedWeight | None = None

    def load_packed(self, packed: PackedWeight, shard: int | None = None) -> None:
        """Keep the table in GGUF blocks; the dense table is released."""
        if (packed.out_features, packed.in_features) != (self.num_embeddings, self.embedding_dim):
            raise ValueError(f"shape mismatch: expects {self.num_embeddings} x {self.embedding_dim}, checkpoint has "
                             f"{packed.out_features} x {packed.in_features}")
        self.packed = packed
        self.weight = nn.Parameter(torch.empty(0, dtype=self.dtype), requires_grad=False)

    def _load_weight(self, param: nn.Parameter, loaded: torch.Tensor, shard: int | None) -> None:
        load_vocab_rows(param, loaded, self.vocab_start, self.num_embeddings)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        packed = self.packed
        if self.parallel.tp_size > 1:
            local = ids - self.vocab_start
            outside = (local < 0) | (local >= self.weight.shape[0])
            rows = F.embedding(local.masked_fill(outside, 0), self.weight)
            return all_reduce(rows.masked_fill(outside[:, None], 0.0), self.parallel)
        if packed is None:
            return F.embedding(ids, self.weight)
        return cpu_quant.dequantize_rows(packed.blocks, packed.format, self.embedding_dim, ids, self.dtype)
