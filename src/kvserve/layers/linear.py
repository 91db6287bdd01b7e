"""Linear layers whose parameters know how to load Hugging Face shards.

`MergedLinear` holds several HF projections as one weight (q/k/v, or gate/up) so
that a step does one matmul instead of several; each HF tensor is copied into
its row range by the parameter's `weight_loader`.

On CPU the kernel plan (models/kernel_plan.py) gives each layer a `kernel`
(layers/cpu_linear.py) for products with few rows, where `F.linear` is slow; more
rows go to torch's GEMM.

The weight format is the layer's method, chosen at load: the dense `weight`, or,
for a GGUF whose blocks the CPU kernels read, `quantized` (layers/quantized_linear.py)
holding the blocks as the file stores them; the dense weight is then empty.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kvserve.layers.activation import silu_and_mul
from kvserve.layers.cpu_linear import CpuLinearKernel
from kvserve.layers.packed_weight import PackedWeight
from kvserve.layers.quantized_linear import QuantizedLinear


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor) -> None:
    if param.shape != loaded.shape:
        raise ValueError(f"shape mismatch: parameter {tuple(param.shape)} vs checkpoint {tuple(loaded.shape)}")
    param.data.copy_(loaded)


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.kernel: CpuLinearKernel | None = None  # installed by the kernel plan where it is faster
        self.quantized: QuantizedLinear | None = None  # the weight kept in GGUF blocks (then `weight` is empty)

    def load_packed(self, packed: PackedWeight, shard: int | None = None) -> None:
        """Take (rows of) the weight in GGUF blocks; the dense weight is released."""
        if self.quantized is None:
            self.quantized = QuantizedLinear(self.out_features, self.in_features)
            self.weight = nn.Parameter(torch.empty(0, dtype=self.weight.dtype), requires_grad=False)
        start = 0 if shard is None else self.offsets[shard]
        expected = self.out_features if shard is None else self.output_sizes[shard]
        if packed.out_features != expected or packed.in_features != self.in_features:
            raise ValueError(f"shape mismatch: expects {expected} x {self.in_features}, checkpoint has "
                             f"{packed.out_features} x {packed.in_features}")
        self.quantized.add(start, packed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantized is not None:
            return self.quantized(x, self.bias)
        kernel = self.kernel
        if kernel is not None and x.shape[0] <= kernel.max_rows:
            return kernel(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)

    def forward_silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        """self(silu_and_mul(x)) for x = [gate | up]: one kernel call where the CPU kernel fuses the
        two (the SiLU is computed while x is widened for the product, not stored and read back)."""
        kernel = self.kernel
        if kernel is not None and kernel.silu_fn is not None and x.dtype == torch.bfloat16 and x.shape[0] <= kernel.max_rows:
            return kernel.silu_and_linear(x, self.weight, self.bias)
        return self(silu_and_mul(x))


class MergedLinear(Linear):
    """Several projections of the same input stacked along the output dimension."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = False) -> None:
        super().__init__(in_features, sum(output_sizes), bias)
        self.output_sizes = output_sizes
        self.offsets = [sum(output_sizes[:i]) for i in range(len(output_sizes))]
        for param in (self.weight, self.bias):
            if param is not None:
                param.weight_loader = self._load_shard

    def _load_shard(self, param: nn.Parameter, loaded: torch.Tensor, shard: int) -> None:
        start, size = self.offsets[shard], self.output_sizes[shard]
        target = param.data.narrow(0, start, size)
        if target.shape != loaded.shape:
            raise ValueError(f"shape mismatch: shard {shard} expects {tuple(target.shape)}, checkpoint has {tuple(loaded.shape)}")
        target.copy_(loaded)
