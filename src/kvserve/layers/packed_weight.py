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

_Q8_0 = int(GGMLQuantizationType.Q8_0)
# formats whose blocks are w = d (q - zero point) with q - z in -16..15: Q8_0 blocks of the same d hold them
_ZERO_POINTS = {int(GGMLQuantizationType.Q4_0): 8, int(GGMLQuantizationType.Q5_0): 16}


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

    @property
    def fits_q8_0(self) -> bool:
        """Whether `as_q8_0` holds these weights exactly (Q8_0, Q4_0, Q5_0)."""
        return self.format == _Q8_0 or self.format in _ZERO_POINTS

    def as_q8_0(self) -> PackedWeight:
        """The same weights in Q8_0 blocks, equal when dequantized: each Q4_0 / Q5_0 block's d, then its
        integers q - z as int8 (34 bytes a block instead of 18 / 22)."""
        if self.format == _Q8_0:
            return self
        if self.format not in _ZERO_POINTS:
            raise ValueError(f"{self.format_name} blocks do not convert exactly to Q8_0")
        rows = self.blocks.shape[0]
        blocks = self.blocks.reshape(rows, self.in_features // 32, -1)
        qs = blocks[..., -16:]  # byte j: weight j in the low nibble, j + 16 in the high one
        q = torch.cat([qs & 0xF, qs >> 4], dim=-1).to(torch.int32)
        if self.format == int(GGMLQuantizationType.Q5_0):  # bit j of the little-endian uint32 qh: weight j's fifth bit
            qh = sum(blocks[..., 2 + i].to(torch.int64) << (8 * i) for i in range(4))
            q |= (((qh[..., None] >> torch.arange(32)) & 1) << 4).to(torch.int32)
        q8 = (q - _ZERO_POINTS[self.format]).to(torch.int8).view(torch.uint8)
        return PackedWeight(_Q8_0, torch.cat([blocks[..., :2], q8], dim=-1).reshape(rows, -1), self.in_features)

    @staticmethod
    def stack(parts: list[PackedWeight]) -> PackedWeight:
        """Rows of several weights of one format, one after the other (merged projections)."""
        if len({p.format for p in parts}) != 1 or len({p.in_features for p in parts}) != 1:
            raise ValueError("only weights of one format and one input size stack")
        return PackedWeight(parts[0].format, torch.cat([p.blocks for p in parts]), parts[0].in_features)
