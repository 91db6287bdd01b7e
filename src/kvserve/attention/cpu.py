"""CPU paged attention: a C++ kernel (OpenMP, compiled for this CPU on first use) that reads the
KV blocks in place, tiles with an online softmax, shares K/V rows across a GQA group, and splits
long decodes over the cores (Flash-Decoding). See src/kvserve/csrc/paged_attention.cpp.

Built and cached by `kvserve.native` (g++ on first use, ctypes); where it cannot be built,
`load()` returns None and the engine falls back to the reference backend with a logged warning.
"""

from __future__ import annotations

import ctypes
from functools import lru_cache

import torch

from kvserve import native
from kvserve.attention.metadata import AttentionMetadata

QUERY_TILE = 32
SPLIT_LEN = 512
_ENTRY = {torch.float32: "paged_attention_f32", torch.bfloat16: "paged_attention_bf16", torch.float16: "paged_attention_f16"}


@lru_cache(maxsize=1)
def load() -> ctypes.CDLL | None:
    """The compiled kernel library, or None (with a logged warning) when it cannot be built."""
    i64, p = ctypes.c_int64, ctypes.c_void_p
    argtypes = [p, p, p, p, i64, p, p, i64, i64, i64, i64, i64, ctypes.c_float, i64, i64, ctypes.c_int, p]
    return native.load("paged_attention.cpp", {name: argtypes for name in _ENTRY.values()})


def paged_attention_cpu(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    split_len: int = SPLIT_LEN,
) -> torch.Tensor:
    """Same contract as `paged_attention_reference`."""
    lib = load()
    assert lib is not None, "the CPU attention kernel is not available"
    q = q.contiguous()
    out = torch.empty_like(q)
    tables = meta.block_tables.to(torch.int64).contiguous()
    lens = meta.seq_lens.to(torch.int64).contiguous()
    qsl = meta.query_start_loc.to(torch.int64).contiguous()
    getattr(lib, _ENTRY[q.dtype])(
        q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), tables.data_ptr(), tables.shape[1],
        lens.data_ptr(), qsl.data_ptr(), lens.shape[0], q.shape[1], k_cache.shape[2], q.shape[2],
        k_cache.shape[1], scale, QUERY_TILE, split_len, torch.get_num_threads(), out.data_ptr(),
    )
    return out
