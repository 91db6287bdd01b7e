"""PackedWeight: a weight matrix kept in a GGUF block format, as the file stores it.

GGUF quantizes a matrix row by row in blocks of 32 weights (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1) or
256 (the K-quants); a row of K weights is K / block blocks, and the rows follow one
another. Keeping those bytes instead of dequantizing them at load is what makes a
decode step read 3-4x fewer bytes than bf16: the C++ kernels (layers/cpu_quant.py)
multiply on the blocks directly. Rows can be selected, reordered and stacked
without touching a block, which is all the loader needs (merged q/k/v, llama.cpp's
q/k row order).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType


@dataclass
class PackedWeight:
    format: int  # the GGML type id (GGMLQuantizationType)
    blocks: torch.Tensor  # uint8 [rows, row_bytes], contiguous
    in_features: int

    def __post_init__(self) -> None:
        block, nbytes = GGML_QUANT_SIZES[GGMLQuantizationType(self.format)]
        if self.in_features % block or self.blocks.dtype != torch.uint8 or self.blocks.dim() != 2:
            raise ValueError(f"a {self.format_name} weight needs uint8 rows of whole blocks of {block}, "
                             f"got {tuple(self.blocks.shape)} {self.blocks.dtype} for {self.in_features} inputs")
        if self.blocks.shape[1] != self.in_features // block * nbytes:
            raise ValueError(f"{self.format_name} rows of {self.in_features} weights take {self.in_features // block * nbytes} "
                             f"bytes, got {self.blocks.shape[1]}")

    @property
    def format_name(self) -> str:
        return GGMLQuantizationType(self.format).name

    @property
    def out_features(self) -> int:
        return self.blocks.shape[0]

    @property
    def nbytes(self) -> int:
        return self.blocks.numel()

    def rows(self, index: torch.Tensor) -> PackedWeight:
        """The rows `index` (a permutation or a selection), blocks untouched."""
        return PackedWeight(self.format, self.blocks[index].contiguous(), self.in_features)

    @staticmethod
    def stack(parts: list[PackedWeight]) -> PackedWeight:
        """Rows of several weights of one format, one after the other (merged projections)."""
        if len({p.format for p in parts}) != 1 or len({p.in_features for p in parts}) != 1:
            raise ValueError("only weights of one format and one input size stack")
        return PackedWeight(parts[0].format, torch.cat([p.blocks for p in parts]), parts[0].in_features)
