"""QuantizedLinear: how a Linear whose weight stays in GGUF blocks multiplies.

The weight format is a method of the layer: a `Linear` holds either its dense
weight (and, on CPU, the dense C++ kernel) or a `QuantizedLinear`, chosen at load.
Its rows come in parts, each a `PackedWeight` of one format (a merged q/k/v may
mix formats: Q4_K_M files keep v in Q6_K). Adjacent Q4_0 / Q5_0 and Q8_0 parts become
one Q8_0 part (exactly: `PackedWeight.as_q8_0`), since the one-call C++ layer runs
only single-part projections: SmolLM2-135M's Q4_K_M has Q5_0 q/k beside a Q8_0 v in
14 of its 30 layers; re-encoded (+2.3 MB of 100), all 30 run as one call and decode
147 tok/s instead of 110 (medians, two cores; docs/PERFORMANCE.md). Decode-sized
products (up to `MAX_PACKED_ROWS` rows) run on the blocks (`cpu_quant.quant_linear`);
larger ones (prefill chunks) dequantize a slice of weight rows at a time into the
activation dtype and run the dense kernel, so the weights are read packed and
widened only in a buffer that stays in cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvserve.layers import cpu_linear, cpu_quant
from kvserve.layers.packed_weight import PackedWeight

MAX_PACKED_ROWS = 32  # rows up to which the block kernel runs; above, dequantized slices and the dense kernel
_SLICE_ELEMENTS = 4 << 20  # weights dequantized at a time for large products (8 MB in bf16)


class QuantizedLinear:
    def __init__(self, out_features: int, in_features: int) -> None:
        self.out_features = out_features
        self.in_features = in_features
        self.parts: list[tuple[int, PackedWeight]] = []  # (first output row, its rows), in row order

    def add(self, row_start: int, packed: PackedWeight) -> None:
        if packed.in_features != self.in_features or row_start + packed.out_features > self.out_features:
            raise ValueError(f"a packed weight of {packed.out_features} x {packed.in_features} does not fit rows "
                             f"{row_start}.. of a {self.out_features} x {self.in_features} layer")
        self.parts.append((row_start, packed))
        self.parts.sort(key=lambda part: part[0])
        merged: list[tuple[int, PackedWeight]] = []
        for start, part in self.parts:  # adjacent parts of one format become one: one kernel call
            if merged and merged[-1][0] + merged[-1][1].out_features == start:
                previous = merged[-1][1]
                if previous.format != part.format and previous.fits_q8_0 and part.fits_q8_0:
                    previous, part = previous.as_q8_0(), part.as_q8_0()
                if previous.format == part.format:
                    merged[-1] = (merged[-1][0], PackedWeight.stack([previous, part]))
                    continue
            merged.append((start, part))
        self.parts = merged

    @property
    def complete(self) -> bool:
        return sum(p.out_features for _, p in self.parts) == self.out_features

    @property
    def formats(self) -> list[str]:
        return sorted({p.format_name for _, p in self.parts})

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for _, p in self.parts)

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x = x.contiguous()
        if len(self.parts) == 1:
            return self._part(x, self.parts[0][1], bias)
        y = torch.empty(x.shape[0], self.out_features, dtype=x.dtype)
        for start, part in self.parts:
            end = start + part.out_features
            y[:, start:end] = self._part(x, part, None if bias is None else bias[start:end])
        return y

    def _part(self, x: torch.Tensor, part: PackedWeight, bias: torch.Tensor | None) -> torch.Tensor:
        if x.shape[0] <= MAX_PACKED_ROWS:
            return cpu_quant.quant_linear(x, part.blocks, part.format, bias, part.out_features, self.in_features)
        rows = max(1, _SLICE_ELEMENTS // self.in_features)
        y = torch.empty(x.shape[0], part.out_features, dtype=x.dtype)
        for start in range(0, part.out_features, rows):
            end = min(start + rows, part.out_features)
            w = cpu_quant.dequantize(part.blocks, part.format, self.in_features, slice(start, end), x.dtype)
            b = None if bias is None else bias[start:end]
            kernel = cpu_linear.cpu_linear_kernel(x.dtype, w)
            y[:, start:end] = kernel(x, w, b) if kernel is not None and x.shape[0] <= kernel.max_rows else F.linear(x, w, b)
        return y
