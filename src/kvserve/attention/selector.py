"""Pick the attention backend for a device: the fastest one that works here, or the one asked for."""

from __future__ import annotations

import logging
from typing import Callable

import torch

from kvserve.attention.reference import paged_attention_reference

logger = logging.getLogger(__name__)

AttentionFn = Callable[..., torch.Tensor]


def select_backend(name: str, device: str) -> AttentionFn:
    """`name`: auto | reference | cpu. "auto" takes the compiled CPU kernel on CPU when it builds."""
    if name == "reference":
        return paged_attention_reference
    if name in ("auto", "cpu") and device == "cpu":
        from kvserve.attention import cpu

        if cpu.load() is not None:
            return cpu.paged_attention_cpu
        if name == "cpu":
            raise ValueError("attention_backend 'cpu' was asked for, but its kernel could not be built (see the warning above)")
        return paged_attention_reference
    if name == "auto":
        return paged_attention_reference
    raise ValueError(f"attention_backend {name!r} is not available on device {device!r}; use auto or reference")
