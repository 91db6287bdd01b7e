"""Memory advised for 2 MB pages: what a CPU decode step reads, the KV cache and the weights.

Linux backs memory with 2 MB pages (transparent huge pages) only where it may: in its common
`madvise` mode (this project's VMs), just the ranges a process advises with madvise(MADV_HUGEPAGE)
before their first touch, which torch's allocator never does. With 4 KB pages a stream of weights
crosses a page, and costs a TLB miss, every 4 KB, and the hardware prefetchers stop at each page's
end. A decode step streams every weight once: on weights placed on 2 MB pages, 30 layers and the LM
head of SmolLM2-135M in Q8_0 took 5.2-5.4 ms a step instead of 5.9-6.0 (two threads, interleaved;
docs/PERFORMANCE.md). Decode attention reads KV blocks scattered over gigabytes, where a 4 KB page
costs a TLB miss per block. Where huge pages are off, the advice is ignored and nothing is copied.
"""

from __future__ import annotations

import ctypes
import math
import sys
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import torch

HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14
_ALIGN = 64  # each tensor placed by `place_on_huge_pages` starts on a cache line
_THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


@lru_cache(maxsize=1)
def available() -> bool:
    """Whether advised memory can get 2 MB pages here (Linux, transparent huge pages not "never")."""
    if sys.platform != "linux":
        return False
    try:
        return "[never]" not in _THP_MODE.read_text()
    except OSError:
        return False


def advise(tensor: torch.Tensor) -> None:
    """Advise the whole 2 MB pages inside `tensor`'s memory for huge pages. Call it before the memory is
    first written: pages already touched stay 4 KB until the kernel's background compaction finds them."""
    if not available():
        return
    start = -(-tensor.data_ptr() // HUGE_PAGE) * HUGE_PAGE
    end = (tensor.data_ptr() + tensor.numel() * tensor.element_size()) // HUGE_PAGE * HUGE_PAGE
    if end > start:
        ctypes.CDLL(None).madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_HUGEPAGE)


def place_on_huge_pages(holders: Sequence[tuple[object, str]]) -> int:
    """Move the contiguous CPU tensors `getattr(holder, name)` into one allocation advised for 2 MB pages
    and starting on one (so only its last page can be partly empty): each attribute is set to its tensor's
    copy, and holders of the same tensor get the same copy. One tensor at a time, so an original that
    nothing else holds is freed before the next is copied. Returns the bytes moved."""
    groups: dict[tuple[int, torch.dtype, tuple[int, ...]], list[tuple[object, str]]] = {}
    for holder, name in holders:
        t = getattr(holder, name)
        groups.setdefault((t.data_ptr(), t.dtype, tuple(t.shape)), []).append((holder, name))
    if not groups:
        return 0
    offsets, total = [], 0
    for _, dtype, shape in groups:
        offsets.append(total)
        total += -(-math.prod(shape) * dtype.itemsize // _ALIGN) * _ALIGN
    raw = torch.empty(total + HUGE_PAGE, dtype=torch.uint8)
    arena = raw[(-raw.data_ptr()) % HUGE_PAGE:][:total]
    advise(arena)
    for ((_, dtype, shape), group), offset in zip(groups.items(), offsets):
        copy = arena[offset:offset + math.prod(shape) * dtype.itemsize].view(dtype).view(shape)
        copy.copy_(getattr(*group[0]))
        for holder, name in group:
            setattr(holder, name, copy)
    return total
