"""Linear layers whose parameters know how to load Hugging Face shards, whole or (tensor parallel) in part.

`MergedLinear` holds several HF projections as one weight (q/k/v, or gate/up) so
that a step does one matmul instead of several; each HF tensor is copied into
its row range by the parameter's `weight_loader`. Under tensor parallelism
(Megatron's split, as in vLLM) the same class is column-parallel: each part
keeps only this rank's slice of the checkpoint's rows (its attention heads, its
share of the MLP), and the product needs no communication. `RowParallelLinear`
keeps a slice of the input columns and sums the partial products over the ranks
with one all-reduce (the bias added once, after it). `ParallelLMHead` keeps a
slice of the vocabulary and gathers the logits.

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

from kvserve.distributed.communication import all_gather_last_dim, all_reduce
from kvserve.distributed.parallel_state import ParallelContext
from kvserve.layers.activation import silu_and_mul
from kvserve.layers.cpu_linear import CpuLinearKernel
from kvserve.layers.packed_weight import PackedWeight
from kvserve.layers.quantized_linear import QuantizedLinear


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor, shard: int | None = None) -> None:
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

    def product(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x @ weight.T (+ bias) through the weight's format and the fastest kernel for x's rows."""
        if self.quantized is not None:
            return self.quantized(x, bias)
        kernel = self.kernel
        if kernel is not None and x.shape[0] <= kernel.max_rows:
            return kernel(x, self.weight, bias)
        return F.linear(x, self.weight, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.product(x, self.bias)

    def fused_silu_kernel(self, x: torch.Tensor) -> CpuLinearKernel | None:
        """The kernel that takes x = [gate | up] and applies the SiLU while widening x, where it fits x."""
        kernel = self.kernel
        if kernel is not None and kernel.silu_fn is not None and x.dtype == torch.bfloat16 and x.shape[0] <= kernel.max_rows:
            return kernel
        return None

    def forward_silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        """self(silu_and_mul(x)) for x = [gate | up]: one kernel call where the CPU kernel fuses the
        two (the SiLU is computed while x is widened for the product, not stored and read back)."""
        kernel = self.fused_silu_kernel(x)
        if kernel is not None:
            return kernel.silu_and_linear(x, self.weight, self.bias)
        return self(silu_and_mul(x))


class MergedLinear(Linear):
    """Several projections of the same input stacked along the output dimension, each possibly a slice.

    `output_sizes` are the rows this rank keeps of each part; `checkpoint_slices` where they start in
    the checkpoint's tensor of that part (0 without tensor parallelism). The checkpoint holds the parts
    either as separate tensors (`parts_in_checkpoint`: Llama's q/k/v, loaded by shard index through the
    model's `packed_modules_mapping`) or as one tensor of `checkpoint_sizes` stacked (GPT-2's c_attn, and
    any single column-parallel projection).
    """

    def __init__(
        self, in_features: int, output_sizes: list[int], bias: bool = False, checkpoint_slices: list[int] | None = None,
        checkpoint_sizes: list[int] | None = None, parts_in_checkpoint: bool = True,
    ) -> None:
        super().__init__(in_features, sum(output_sizes), bias)
        self.output_sizes = output_sizes
        self.offsets = [sum(output_sizes[:i]) for i in range(len(output_sizes))]
        self.checkpoint_slices = checkpoint_slices or [0] * len(output_sizes)
        self.checkpoint_sizes = checkpoint_sizes or output_sizes
        for param in (self.weight, self.bias):
            if param is not None:
                param.weight_loader = self._load
                param.num_checkpoint_parts = len(output_sizes) if parts_in_checkpoint else None

    def _load(self, param: nn.Parameter, loaded: torch.Tensor, shard: int | None) -> None:
        if shard is None:  # one checkpoint tensor holding every part
            if loaded.shape[0] != sum(self.checkpoint_sizes):
                raise ValueError(f"shape mismatch: expects {sum(self.checkpoint_sizes)} rows, checkpoint has {tuple(loaded.shape)}")
            for i, part in enumerate(loaded.split(self.checkpoint_sizes, dim=0)):
                self._load_part(param, part, i)
        else:
            self._load_part(param, loaded, shard)

    def _load_part(self, param: nn.Parameter, loaded: torch.Tensor, shard: int) -> None:
        start, size = self.offsets[shard], self.output_sizes[shard]
        target = param.data.narrow(0, start, size)
        if loaded.shape[0] != self.checkpoint_sizes[shard] or target.shape[1:] != loaded.shape[1:]:
            full = (self.checkpoint_sizes[shard], *target.shape[1:])
            raise ValueError(f"shape mismatch: shard {shard} expects {full}, checkpoint has {tuple(loaded.shape)}")
        target.copy_(loaded.narrow(0, self.checkpoint_slices[shard], size))


def column_parallel(in_features: int, out_features: int, bias: bool, parallel: ParallelContext, name: str) -> Linear:
    """A projection whose output rows are split over the tp ranks (no communication in the product)."""
    if parallel.tp_size == 1:
        return Linear(in_features, out_features, bias)
    start, size = parallel.shard(out_features, name)
    return MergedLinear(in_features, [size], bias, [start], [out_features], parts_in_checkpoint=False)


class RowParallelLinear(Linear):
    """A projection whose input columns are split over the tp ranks: partial products summed by one all-reduce."""

    def __init__(self, in_features: int, out_features: int, bias: bool, parallel: ParallelContext, name: str) -> None:
        self.input_start, local = parallel.shard(in_features, name)
        super().__init__(local, out_features, bias)
        self.parallel = parallel
        self.weight.weight_loader = self._load_weight

    def _load_weight(self, param: nn.Parameter, loaded: torch.Tensor, shard: int | None) -> None:
        full = (self.out_features, self.in_features * self.parallel.tp_size)
        if tuple(loaded.shape) != full:
            raise ValueError(f"shape mismatch: parameter {full} vs checkpoint {tuple(loaded.shape)}")
        param.data.copy_(loaded.narrow(1, self.input_start, self.in_features))

    def _reduced(self, partial: torch.Tensor) -> torch.Tensor:
        out = all_reduce(partial, self.parallel)
        return out if self.bias is None else out + self.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.parallel.tp_size == 1:
            return super().forward(x)
        return self._reduced(self.product(x, None))

    def forward_silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        kernel = self.fused_silu_kernel(x)
        if self.parallel.tp_size == 1 or kernel is None:
            return super().forward_silu_and_mul(x)
        return self._reduced(kernel.silu_and_linear(x, self.weight, None))


def vocab_shard(vocab_size: int, parallel: ParallelContext) -> tuple[int, int]:
    """(first token id, rows) of this rank's slice of a vocabulary-sized table: ceil(V / tp) rows, the
    last rank's tail padded with zero rows where V does not divide."""
    rows = -(-vocab_size // parallel.tp_size)
    return parallel.tp_rank * rows, rows


def load_vocab_rows(param: nn.Parameter, loaded: torch.Tensor, start: int, vocab_size: int) -> None:
    """Copy this rank's rows [start, start + len(param)) of a [vocab, hidden] table; zero the padding."""
    if loaded.shape[0] != vocab_size or loaded.shape[1:] != param.shape[1:]:
        raise ValueError(f"shape mismatch: parameter ({vocab_size}, {param.shape[1]}) vs checkpoint {tuple(loaded.shape)}")
    real = max(0, min(param.shape[0], vocab_size - start))
    param.data.zero_()
    param.data[:real].copy_(loaded[start : start + real])


class ParallelLMHead(Linear):
    """The LM head with its vocabulary split over the tp ranks; `logits` gathers every rank's slice."""

    def __init__(self, hidden_size: int, vocab_size: int, parallel: ParallelContext) -> None:
        self.vocab_start, rows = vocab_shard(vocab_size, parallel)
        super().__init__(hidden_size, rows)
        self.vocab_size = vocab_size
        self.parallel = parallel
        if parallel.tp_size > 1:
            self.weight.weight_loader = self._load_weight

    def _load_weight(self, param: nn.Parameter, loaded: torch.Tensor, shard: int | None) -> None:
        load_vocab_rows(param, loaded, self.vocab_start, self.vocab_size)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        local = self(hidden)
        if self.parallel.tp_size == 1:
            return local
        return all_gather_last_dim(local, self.parallel)[:, : self.vocab_size]
