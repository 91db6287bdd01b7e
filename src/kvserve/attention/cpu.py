"""CPU paged attention: a C++ kernel (OpenMP, compiled for this CPU on first use) that reads the
KV blocks in place, tiles with an online softmax, shares K/V rows across a GQA group, and splits
long decodes over the cores (Flash-Decoding). See csrc/paged_attention.cpp.

The kernel has a plain C ABI: it is built with g++ in a few seconds the first time it is needed
(cached under ~/.cache/kvserve/, keyed by the source's hash) and called through ctypes with the
tensors' data pointers. Where it cannot be built, `load()` returns None and the engine falls back
to the reference backend with a logged warning.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

from kvserve.attention.metadata import AttentionMetadata

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).parent / "csrc" / "paged_attention.cpp"
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
QUERY_TILE = 32
SPLIT_LEN = 512
_ENTRY = {torch.float32: "paged_attention_f32", torch.bfloat16: "paged_attention_bf16", torch.float16: "paged_attention_f16"}


def _cache_dir() -> Path:
    root = os.environ.get("KVSERVE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "kvserve")
    return Path(root)


@lru_cache(maxsize=1)
def load() -> ctypes.CDLL | None:
    """The compiled kernel library, or None (with a logged warning) when it cannot be built."""
    if os.environ.get("KVSERVE_DISABLE_CPU_KERNEL"):
        return None
    source = _SOURCE.read_bytes()
    digest = hashlib.sha256(source + " ".join(_FLAGS).encode()).hexdigest()[:16]
    library = _cache_dir() / f"paged_attention-{digest}.so"
    try:
        if not library.exists():
            library.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=library.parent) as tmp:
                built = Path(tmp) / library.name
                subprocess.run(["g++", *_FLAGS, "-o", str(built), str(_SOURCE)], check=True, capture_output=True, text=True)
                os.replace(built, library)  # atomic: concurrent builders never load a half-written file
        lib = ctypes.CDLL(str(library))
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", "") or str(exc)
        logger.warning("the CPU attention kernel could not be built (%s); using the reference backend", detail.strip()[:500])
        return None
    i64, p = ctypes.c_int64, ctypes.c_void_p
    for name in _ENTRY.values():
        fn = getattr(lib, name)
        fn.restype = None
        fn.argtypes = [p, p, p, p, i64, p, p, i64, i64, i64, i64, i64, ctypes.c_float, i64, i64, ctypes.c_int, p]
    return lib


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
