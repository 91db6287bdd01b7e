"""Pick the attention backend for a device: the fastest one that works here, or the one asked for."""

from __future__ import annotations

import logging

from kvserve.attention.backend import AttentionBackend
from kvserve.attention.reference import ReferenceBackend

logger = logging.getLogger(__name__)


def _triton_backend() -> AttentionBackend | None:
    """The Triton kernels, or None (with the reason logged) when triton does not import."""
    try:
        from kvserve.attention.triton_attention import TritonBackend  # imports triton
    except ImportError as exc:
        logger.warning("the Triton attention backend is unavailable (%s)", exc)
        return None
    return TritonBackend()


def select_backend(name: str, device: str) -> AttentionBackend:
    """`name`: auto | reference | cpu | triton.

    "auto" takes the compiled CPU kernel on CPU when it builds, and the Triton kernels on CUDA
    when triton imports; otherwise the reference backend. Every backend reads caches of every
    --kv-cache-dtype and gives the log-sum-exp that attention sinks need.
    """
    if name == "reference":
        return ReferenceBackend()
    if name in ("auto", "cpu") and device == "cpu":
        from kvserve.attention import cpu

        if cpu.load() is not None:
            return cpu.CpuBackend()
        if name == "cpu":
            raise ValueError("attention_backend 'cpu' was asked for, but its kernel could not be built (see the warning above)")
        return ReferenceBackend()
    if name in ("auto", "triton") and device == "cuda":
        backend = _triton_backend()
        if backend is not None:
            return backend
        if name == "triton":
            raise ValueError("attention_backend 'triton' was asked for, but triton does not import (pip install triton; see the warning above)")
        logger.warning("using the reference attention backend on CUDA")
        return ReferenceBackend()
    if name == "auto":
        return ReferenceBackend()
    if name == "triton":
        raise ValueError(f"attention_backend 'triton' runs on CUDA devices only, not on {device!r}; use auto or reference")
    raise ValueError(f"attention_backend {name!r} is not available on device {device!r}; use auto or reference")
