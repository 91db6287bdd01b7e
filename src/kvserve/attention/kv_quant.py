"""The KV cache's element formats (`--kv-cache-dtype`, vLLM's flag) and their quantization in torch.

"auto" keeps K and V in the model's dtype. "int8" and "fp8_e4m3" store each (token, kv head) row of
head_dim values quantized symmetrically with its own fp32 scale: scale = amax / 127 (int8, values
rounded to nearest even) or amax / 448 (fp8 e4m3, torch.float8_e4m3fn, saturating), value = x / scale.
A row's own scale (rather than one per block) follows each token's outliers: a large key in a block
never coarsens its neighbours.

`quantize` is the definition: the C++ `store_kv` (csrc/paged_attention.cpp, quantize_row) writes the
same bytes, and the reference backend uses it to store and `dequantize` to read. The scales live in
their own fp32 tensors shaped [num_blocks, num_kv_heads, block_size]: a kv head's scales of a block
are contiguous, so the kernel loads a chunk's 16 with one vector load.
"""

from __future__ import annotations

import torch

from kvserve.validation import check

KV_CACHE_DTYPES = ("auto", "int8", "fp8_e4m3")
# the storage dtype of each quantized format, and the magnitude its scale maps a row's amax to
STORAGE_DTYPES = {"int8": torch.int8, "fp8_e4m3": torch.float8_e4m3fn}
QMAX = {"int8": 127.0, "fp8_e4m3": 448.0}
SCALE_DTYPE = torch.float32
SCALE_BYTES = 4  # one scale per (token, kv head) for K and one for V


def check_kv_cache_dtype(kv_cache_dtype: str) -> None:
    """ValueError naming the parameter unless `kv_cache_dtype` is one of KV_CACHE_DTYPES."""
    check(kv_cache_dtype in KV_CACHE_DTYPES, "kv_cache_dtype", kv_cache_dtype, f"one of {', '.join(KV_CACHE_DTYPES)}")


def is_quantized(kv_cache_dtype: str) -> bool:
    return kv_cache_dtype != "auto"


def format_of(storage_dtype: torch.dtype) -> str:
    """The quantized format whose values are stored as `storage_dtype` (int8 or fp8_e4m3)."""
    return next(name for name, dtype in STORAGE_DTYPES.items() if dtype == storage_dtype)


def describe(kv_cache_dtype: str, model_dtype: torch.dtype) -> str:
    """What the cache holds, for the start-up log: "bfloat16", "int8 + fp32 scales"."""
    if is_quantized(kv_cache_dtype):
        return f"{kv_cache_dtype} + fp32 scales"
    return str(model_dtype).removeprefix("torch.")


def cache_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """The dtype of the K and V tensors of the cache."""
    return STORAGE_DTYPES.get(kv_cache_dtype, model_dtype)


def bytes_per_head_token(kv_cache_dtype: str, model_dtype: torch.dtype, head_dim: int) -> int:
    """Bytes one token takes in one kv head's K (or V): its values, and its scale where quantized."""
    element = torch.empty((), dtype=cache_dtype(kv_cache_dtype, model_dtype)).element_size()
    return head_dim * element + (SCALE_BYTES if is_quantized(kv_cache_dtype) else 0)


def quantize(x: torch.Tensor, kv_cache_dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (values [..., D] of the storage dtype, scales [...] fp32), one scale per row of D.

    An all-zero row gets scale 0 (its values divide by 1 instead)."""
    x = x.float()
    scale = x.abs().amax(dim=-1) / QMAX[kv_cache_dtype]
    y = x / torch.where(scale > 0, scale, 1.0).unsqueeze(-1)
    if kv_cache_dtype == "int8":
        values = y.round().clamp(-127, 127).to(torch.int8)
    else:
        values = y.clamp(-448, 448).to(torch.float8_e4m3fn)
    return values, scale


def dequantize(values: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """values [..., D] times their scales [...], as `dtype`."""
    return (values.float() * scale.unsqueeze(-1)).to(dtype)
