"""AttentionMetadata: where each sequence's queries and cached keys are in a flat batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    """The flat batch as attention sees it.

    The batch holds `num_seqs` sequences. The first `num_decodes` have exactly one
    query token each (decodes); the rest are prefill chunks. Sequence i's queries
    are rows `query_start_loc[i]:query_start_loc[i+1]` of q, at absolute positions
    `seq_lens[i] - query_len .. seq_lens[i] - 1`: it attends causally to
    `seq_lens[i]` keys, all of which are in the cache (new K/V are written by
    `slot_mapping` before attention reads them) through `block_tables[i]`.
    """

    slot_mapping: torch.Tensor  # [num_tokens] int64: cache slot of each new token
    query_start_loc: torch.Tensor  # [num_seqs + 1] int64
    seq_lens: torch.Tensor  # [num_seqs] int64: context length including this step's tokens
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int64, padded with 0
    num_decodes: int
    query_start_loc_cpu: list[int]
    seq_lens_cpu: list[int]
    block_size: int

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def max_decode_seq_len(self) -> int:
        return max(self.seq_lens_cpu[: self.num_decodes], default=0)
