"""Apply grammar bitmasks to logits: the tokens a constrained row may not take get -inf, in place.

One call for all constrained rows of a step: the C++ kernel (csrc/token_bitmask.cpp) on CPU fp32 logits when
it builds, else torch (bits unpacked into a bool mask, then masked_fill), which also serves CUDA tensors.
"""

from __future__ import annotations

import ctypes
from functools import lru_cache

import torch

from kvserve import native

_BIT_SHIFTS = torch.arange(32, dtype=torch.int32)


@lru_cache(maxsize=1)
def load() -> ctypes.CDLL | None:
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    return native.load("token_bitmask.cpp", {"apply_token_bitmask_f32": [p, i64, p, i64, p, i64]})


def apply_token_bitmask_(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """Row `rows[i]` of `logits` [batch, vocab] keeps only the tokens allowed by row i of `bitmask` [len(rows), words]
    (int32, bit t % 32 of word t // 32); ids past the bitmask's words are forbidden."""
    if not rows:
        return
    vocab = logits.shape[1]
    bitmask = bitmask.contiguous()
    if logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.is_contiguous() and load() is not None:
        index = torch.tensor(rows, dtype=torch.int64)
        load().apply_token_bitmask_f32(logits.data_ptr(), vocab, bitmask.data_ptr(), bitmask.shape[1], index.data_ptr(), len(rows))
        return
    apply_token_bitmask_torch_(logits, bitmask, rows)


def apply_token_bitmask_torch_(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """`apply_token_bitmask_` in torch ops (any device and dtype): bits unpacked into a bool mask, then masked_fill."""
    vocab = logits.shape[1]
    bits = ((bitmask.to(logits.device)[:, :, None] >> _BIT_SHIFTS.to(logits.device)) & 1).bool().view(len(rows), -1)
    allowed = torch.zeros((len(rows), vocab), dtype=torch.bool, device=logits.device)
    width = min(vocab, bits.shape[1])
    allowed[:, :width] = bits[:, :width]
    index = torch.tensor(rows, device=logits.device)
    logits[index] = logits[index].masked_fill(~allowed, float("-inf"))
