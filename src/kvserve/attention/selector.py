"""Pick the attention backend for a device: the fastest one that works here, or the one asked for."""

from __future__ import annotations

import logging
from typing import Callable

import torch

from kvserve.attention.reference import paged_attention_reference

logger = logging.getLogger(__name__)

AttentionFn = Callable[..., torch.Tensor]


def _triton_backend() -> AttentionFn | None:
    """The Triton kernels, or None (with the reason logged) when triton does not import."""
    try:
        from kvserve.attention.triton_attention import paged_attention_triton  # imports triton
    except ImportError as exc:
        logger.warning("the Triton attention backend is unavailable (%s)", exc)
        return None
    return paged_attention_triton


def select_backend(name: str, device: str) -> AttentionFn:
    """`name`: auto | reference | cpu | triton.

    "auto" takes the compiled CPU kernel on CPU when it builds, and the Triton kernels on CUDA
    when triton imports; otherwise the reference backend.
    """
    if name == "reference":
        return paged_attention_reference
    if name in ("auto", "cpu") and device == "cpu":
        from kvserve.attention import cpu

        if cpu.load() is not None:
            return cpu.paged_attention_cpu
        if name == "cpu":
            raise ValueError("attention_backend 'cpu' was asked for, but its kernel could not be built (see the warning above)")
        return paged_attention_reference
    if name in ("auto", "triton") and device == "cuda":
        backend = _triton_backend()
        if backend is not None:
            return backend
        if name == "triton":
            raise ValueError("attention_backend 'triton' was asked for, but triton does not import (pip install triton; see the warning above)")
        logger.warning("using the reference attention backend on CUDA")
        return paged_attention_reference
    if name == "auto":
        return paged_attention_reference
    if name == "triton":
        raise ValueError(f"attention_backend 'triton' runs on CUDA devices only, not on {device!r}; use auto or reference")
    raise ValueError(f"attention_backend {name!r} is not available on device {device!r}; use auto or reference")
