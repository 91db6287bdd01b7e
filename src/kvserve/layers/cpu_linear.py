"""The CPU matmul kernel for the few-row products of decode steps (src/kvserve/csrc/linear.cpp).

`F.linear` with 1-32 rows streams weights at a quarter of this CPU's read bandwidth
(and fp32 with 2-8 rows is slower than with 1); the kernel reads each weight row
once per call at close to the bandwidth. Above `max_rows` (prefill chunks, large
batches) torch's fp32 GEMM is faster and is used instead; the limits come from
`benchmarks/linear_kernel.py` (docs/PERFORMANCE.md).
"""

from __future__ import annotations

import ctypes
from functools import lru_cache

import torch

from kvserve import native
from kvserve.config import cpu_flags

_ENTRY = {
    (torch.float32, torch.float32): "linear_f32_f32",
    (torch.bfloat16, torch.bfloat16): "linear_bf16_bf16",
    (torch.float32, torch.bfloat16): "linear_f32_bf16",
}
# Up to how many rows the kernel beats F.linear (benchmarks/linear_kernel.py, docs/PERFORMANCE.md):
# fp32 MKL takes over between 32 and 64 rows. In bf16 the kernel never loses: without native bf16
# torch's bf16 matmul is emulated (4-6x slower), and with AVX-512 BF16 both run on vdpbf16ps, the
# kernel 1.1-1.5x faster up to 128 rows and level from 512 (Zen 4). With AMX (not measured here)
# oneDNN's tile multiplies should win large products, so AMX CPUs get fp32's limit.
_FUSED_SILU = "linear_silu_bf16_bf16"
NO_LIMIT = 1 << 62
MAX_ROWS_FP32 = 48


def max_rows(weight_dtype: torch.dtype) -> int:
    if weight_dtype == torch.bfloat16 and "amx_bf16" not in cpu_flags():
        return NO_LIMIT
    return MAX_ROWS_FP32


@lru_cache(maxsize=1)
def load() -> ctypes.CDLL | None:
    """The compiled kernel library, or None (with a logged warning) when it cannot be built."""
    i64, p = ctypes.c_int64, ctypes.c_void_p
    argtypes = [p, p, p, p, i64, i64, i64, ctypes.c_int]
    lib = native.load("linear.cpp", {name: argtypes for name in _ENTRY.values()})
    if lib is not None and hasattr(lib, _FUSED_SILU):  # built only with the AVX-512 BF16 path
        getattr(lib, _FUSED_SILU).argtypes = argtypes
        getattr(lib, _FUSED_SILU).restype = None
    return lib


class CpuLinearKernel:
    """y = x @ weight.T + bias through the C++ kernel, for x of at most `max_rows` rows.

    `silu_fn`, where the library has it (bf16 on AVX-512 BF16), also takes x = [gate | up] and
    multiplies silu(gate) * up, computed while x is widened for the product (`silu_and_linear`).
    """

    def __init__(self, fn: ctypes._CFuncPtr, max_rows: int, silu_fn: ctypes._CFuncPtr | None = None) -> None:
        self.fn = fn
        self.max_rows = max_rows
        self.silu_fn = silu_fn

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x = x.contiguous()
        m, k = x.shape
        n = weight.shape[0]
        y = torch.empty(m, n, dtype=x.dtype)
        self.fn(x.data_ptr(), weight.data_ptr(), None if bias is None else bias.data_ptr(), y.data_ptr(), m, n, k, torch.get_num_threads())
        return y

    def silu_and_linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """(silu(gate) * up) @ weight.T + bias for x = [gate | up]; needs `silu_fn`."""
        x = x.contiguous()
        m, k = x.shape[0], x.shape[1] // 2
        n = weight.shape[0]
        y = torch.empty(m, n, dtype=x.dtype)
        self.silu_fn(x.data_ptr(), weight.data_ptr(), None if bias is None else bias.data_ptr(), y.data_ptr(), m, n, k, torch.get_num_threads())
        return y


def cpu_linear_kernel(x_dtype: torch.dtype, weight: torch.Tensor) -> CpuLinearKernel | None:
    """The kernel for this activation dtype and weight, or None where torch must do it."""
    if weight.device.type != "cpu" or weight.dim() != 2 or not weight.is_contiguous():
        return None
    name = _ENTRY.get((x_dtype, weight.dtype))
    lib = load() if name is not None else None
    if lib is None:
        return None
    silu_fn = getattr(lib, _FUSED_SILU, None) if name == "linear_bf16_bf16" else None
    return CpuLinearKernel(getattr(lib, name), max_rows(weight.dtype), silu_fn)
