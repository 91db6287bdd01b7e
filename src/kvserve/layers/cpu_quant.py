"""Linear products and dequantization on GGUF-quantized weights kept in their packed blocks
(src/kvserve/csrc/quant_linear.cpp).

A quantized weight is a contiguous uint8 tensor [N, K // block_weights * block_bytes]: each of
its N rows is K weights in GGML blocks, exactly as stored in the GGUF file. `quant_linear`
multiplies few-row activations against it without dequantizing (the activations are quantized
to int8 blocks of 32 per call, as llama.cpp does: see the C++ file for the method and its
error); `dequantize` expands a slice of rows for large products (the caller then runs a dense
GEMM) and `dequantize_rows` gathers rows (an embedding lookup). Formats are GGML type ids.
"""

from __future__ import annotations

import ctypes
from functools import lru_cache

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from kvserve import native

_KERNEL_TYPES = (GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q5_0, GGMLQuantizationType.Q5_1,
                 GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q5_K, GGMLQuantizationType.Q6_K)
# GGML type id -> (weights per block, bytes per block), and its name, for the formats the kernels read
SUPPORTED_FORMATS: dict[int, tuple[int, int]] = {int(t): GGML_QUANT_SIZES[t] for t in _KERNEL_TYPES}
FORMAT_NAMES = {int(t): t.name for t in _KERNEL_TYPES}
_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16"}


@lru_cache(maxsize=1)
def load() -> ctypes.CDLL | None:
    """The compiled kernel library, or None (with a logged warning) when it cannot be built."""
    i64, p, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    signatures: dict[str, list] = {}
    for suffix in _SUFFIX.values():
        signatures[f"quant_linear_{suffix}"] = [p, p, i32, p, p, i64, i64, i64, i32]
        signatures[f"dequantize_{suffix}"] = [p, i32, i64, i64, i64, p]
        signatures[f"dequantize_rows_{suffix}"] = [p, i32, p, i64, i64, p]
    return native.load("quant_linear.cpp", signatures)


def _library() -> ctypes.CDLL:
    lib = load()
    if lib is None:
        raise RuntimeError("the quantized-linear C++ kernel could not be built here (see the logged warning)")
    return lib


def format_name(format: int) -> str:
    """The GGML name of a type id ("Q4_1" for 3), or "GGML type N" for an id gguf does not know."""
    try:
        return GGMLQuantizationType(format).name
    except ValueError:
        return f"GGML type {format}"


def _check_blocks(blocks: torch.Tensor, format: int, k: int) -> int:
    """The number of weight rows of `blocks`, after checking it holds rows of K weights in `format`."""
    if format not in SUPPORTED_FORMATS:
        raise ValueError(f"quantized format {format_name(format)} (GGML type {format}) is not supported by the CPU kernels; "
                         "supported: " + ", ".join(f"{FORMAT_NAMES[f]} ({f})" for f in SUPPORTED_FORMATS))
    block_weights, block_bytes = SUPPORTED_FORMATS[format]
    if k <= 0 or k % block_weights:
        raise ValueError(f"K = {k} is not a positive multiple of {FORMAT_NAMES[format]}'s block of {block_weights} weights")
    row_bytes = k // block_weights * block_bytes
    if blocks.dtype != torch.uint8 or blocks.dim() != 2 or blocks.shape[1] != row_bytes or not blocks.is_contiguous():
        raise ValueError(f"{FORMAT_NAMES[format]} blocks for K = {k} must be a contiguous uint8 tensor [N, {row_bytes}]; "
                         f"got {blocks.dtype} {tuple(blocks.shape)}")
    if blocks.device.type != "cpu":
        raise ValueError("quantized blocks must be on the CPU")
    return blocks.shape[0]


def _check_dtype(dtype: torch.dtype) -> str:
    if dtype not in _SUFFIX:
        raise ValueError(f"dtype {dtype} is not supported (float32 or bfloat16)")
    return _SUFFIX[dtype]


def quant_linear(x: torch.Tensor, blocks: torch.Tensor, format: int, bias: torch.Tensor | None, n: int, k: int) -> torch.Tensor:
    """y[M, N] = x[M, K] @ dequantize(blocks).T (+ bias), in x's dtype (fp32 or bf16); bias in x's dtype."""
    rows = _check_blocks(blocks, format, k)
    suffix = _check_dtype(x.dtype)
    if rows != n:
        raise ValueError(f"blocks hold {rows} rows, not N = {n}")
    if x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"x must be [M, {k}]; got {tuple(x.shape)}")
    if bias is not None and (bias.dtype != x.dtype or bias.shape != (n,)):
        raise ValueError(f"bias must be [{n}] in {x.dtype}; got {bias.dtype} {tuple(bias.shape)}")
    x = x.contiguous()
    bias = None if bias is None else bias.contiguous()
    y = torch.empty(x.shape[0], n, dtype=x.dtype)
    getattr(_library(), f"quant_linear_{suffix}")(
        x.data_ptr(), blocks.data_ptr(), format, None if bias is None else bias.data_ptr(), y.data_ptr(),
        x.shape[0], n, k, torch.get_num_threads(),
    )
    return y


def dequantize(blocks: torch.Tensor, format: int, k: int, rows: slice | None = None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rows `rows` (a slice with step 1; all rows when None) of the weight, as a [rows, K] tensor of `dtype`."""
    n = _check_blocks(blocks, format, k)
    suffix = _check_dtype(dtype)
    begin, end, step = (rows or slice(None)).indices(n)
    if step != 1:
        raise ValueError("rows must be a slice with step 1")
    end = max(begin, end)
    out = torch.empty(end - begin, k, dtype=dtype)
    getattr(_library(), f"dequantize_{suffix}")(blocks.data_ptr(), format, begin, end, k, out.data_ptr())
    return out


def dequantize_rows(blocks: torch.Tensor, format: int, k: int, ids: torch.Tensor,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rows `ids` of the weight (any shape of integer ids), as a tensor [*ids.shape, K] of `dtype`."""
    n = _check_blocks(blocks, format, k)
    suffix = _check_dtype(dtype)
    flat = ids.reshape(-1).to(torch.int64).contiguous()
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= n):
        raise IndexError(f"row ids must be in [0, {n})")
    out = torch.empty(flat.numel(), k, dtype=dtype)
    getattr(_library(), f"dequantize_rows_{suffix}")(blocks.data_ptr(), format, flat.data_ptr(), flat.numel(), k, out.data_ptr())
    return out.reshape(*ids.shape, k)
