"""Fused RMSNorm(+residual), SiLU·mul and rotary for CPU tensors (src/kvserve/csrc/pointwise.cpp),
and the sampler's argmax + logsumexp of the logits in one read.

At decode these ops touch a few KB each, so in torch their cost is dispatching the
3-10 small ops each is made of; here each is one call. The layers use them for
contiguous fp32/bf16 CPU tensors when the library builds (`available`), torch
otherwise.
"""

from __future__ import annotations

import ctypes
from functools import lru_cache

import torch

from kvserve import native

_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16"}


@lru_cache(maxsize=1)
def load() -> ctypes.CDLL | None:
    """The compiled library, or None (with a logged warning) when it cannot be built."""
    i64, p = ctypes.c_int64, ctypes.c_void_p
    signatures: dict[str, list] = {}
    for suffix in _SUFFIX.values():
        signatures[f"argmax_logsumexp_{suffix}"] = [p, i64, i64, p, p]
        signatures[f"rms_norm_{suffix}"] = [p, p, p, p, i64, i64, ctypes.c_float]
        signatures[f"silu_and_mul_{suffix}"] = [p, p, i64, i64]
        signatures[f"rotary_{suffix}"] = [p, p, i64, i64, p, i64, i64, i64, p, p, i64]
    return native.load("pointwise.cpp", signatures)


def available(x: torch.Tensor) -> bool:
    """Whether the fused kernels can take `x` (a CPU fp32/bf16 tensor) here."""
    return x.device.type == "cpu" and x.dtype in _SUFFIX and load() is not None


def rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """norm(x) * weight; with `residual`, first residual += x in place and normalize that."""
    x = x.contiguous()
    out = torch.empty_like(x)
    hidden = x.shape[-1]
    getattr(load(), f"rms_norm_{_SUFFIX[x.dtype]}")(
        x.data_ptr(), None if residual is None else residual.data_ptr(), weight.data_ptr(), out.data_ptr(),
        x.numel() // hidden, hidden, eps,
    )
    return out


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    x = x.contiguous()
    inner = x.shape[-1] // 2
    out = torch.empty(*x.shape[:-1], inner, dtype=x.dtype)
    getattr(load(), f"silu_and_mul_{_SUFFIX[x.dtype]}")(x.data_ptr(), out.data_ptr(), x.numel() // (2 * inner), inner)
    return out


def rotary_(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate q [T, Hq, D] and k [T, Hkv, D] in place; heads must be contiguous within a token's row."""
    getattr(load(), f"rotary_{_SUFFIX[q.dtype]}")(
        positions.data_ptr(), q.data_ptr(), q.stride(0), q.shape[1], k.data_ptr(), k.stride(0), k.shape[1],
        q.shape[2], cos.data_ptr(), sin.data_ptr(), q.shape[0],
    )


def argmax_logsumexp(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(argmax, logsumexp) of each row of fp32 or bf16 `logits` [rows, vocab], as torch computes them on
    the fp32 values (bf16 rows are widened as they are read, which is exact)."""
    logits = logits.contiguous()
    rows, vocab = logits.shape
    index = torch.empty(rows, dtype=torch.int64)
    lse = torch.empty(rows, dtype=torch.float32)
    getattr(load(), f"argmax_logsumexp_{_SUFFIX[logits.dtype]}")(logits.data_ptr(), rows, vocab, index.data_ptr(), lse.data_ptr())
    return index, lse
