"""CPU paged attention: a C++ kernel (OpenMP, compiled for this CPU on first use) that reads the
KV blocks in place, tiles with an online softmax, shares K/V rows across a GQA group, and splits
long decodes over the cores (Flash-Decoding). See src/kvserve/csrc/paged_attention.cpp.

Built and cached by `kvserve.native` (g++ on first use, ctypes); where it cannot be built,
`load()` returns None and the engine falls back to the reference backend with a logged warning.

The tiling constants live here and are passed to the kernel on every call, by
`paged_attention_cpu` and by the one-call layer (models/llama_cpu_layer.py), so both use the same tiles.

Caches of every `--kv-cache-dtype` are read in place: int8 / fp8 e4m3 ones with their scales
(attention/kv_quant.py), which `store_kv` writes as it quantizes.
"""

from __future__ import annotations

import ctypes
from functools import lru_cache

import torch

from kvserve import native
from kvserve.attention.kv_quant import STORAGE_DTYPES, format_of
from kvserve.attention.metadata import AttentionMetadata
from kvserve.attention.reference import store_kv_index_copy

# Query rows (tokens x query heads per kv head) per prefill work item, measured best of 32-96 for GQA
# groups 1, 3 and 8 (docs/PERFORMANCE.md).
QUERY_TILE = 48
# Keys per slice of a long decode (Flash-Decoding); the kernel splits finer when the decodes are too
# few to give every thread work.
SPLIT_LEN = 512
_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}


@lru_cache(maxsize=1)
def load() -> ctypes.CDLL | None:
    """The compiled kernel library, or None (with a logged warning) when it cannot be built."""
    i64, p = ctypes.c_int64, ctypes.c_void_p
    attention = [p, p, p, p, i64, p, p, i64, i64, i64, i64, i64, ctypes.c_float, i64, i64, i64, ctypes.c_int, p, p]
    store = [p, i64, p, i64, p, i64, i64, p, p]
    # the same with the scales: after k and v (attention); head count, head dim, block size and the scales (store)
    quantized_attention = [*attention[:3], p, p, *attention[3:]]
    quantized_store = [p, i64, p, i64, p, i64, i64, i64, i64, p, p, p, p]
    signatures = {f"paged_attention_{s}": attention for s in _SUFFIX.values()}
    signatures.update({f"store_kv_{s}": store for s in _SUFFIX.values()})
    for s in _SUFFIX.values():
        for kv_format in STORAGE_DTYPES:
            signatures[f"paged_attention_{s}_{kv_format}"] = quantized_attention
            signatures[f"store_kv_{s}_{kv_format}"] = quantized_store
    return native.load("paged_attention.cpp", signatures)


def can_store_kv(k: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether `store_kv` can take these: CPU tensors, k of a kernel dtype and the cache of the same one or
    int8 / fp8 e4m3, each token's heads contiguous."""
    return (
        k_cache.device.type == "cpu" and k.dtype in _SUFFIX and k_cache.dtype in (k.dtype, *STORAGE_DTYPES.values())
        and k_cache.is_contiguous() and k.stride(2) == 1 and k.stride(1) == k.shape[2] and load() is not None
    )


def store_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
) -> None:
    """k_cache/v_cache rows `slot_mapping` = k, v ([T, Hkv, D], rows may be strided views of a fused QKV
    output): `index_copy_` without its per-call cost (~160 us for 2,048 bf16 rows, against ~25 here).
    Into an int8 / fp8 cache each row is quantized, its scale written to k_scale / v_scale
    ([blocks, Hkv, block_size]), byte for byte as `kv_quant.quantize`. Tensors the kernel cannot take
    (`can_store_kv`) go through `index_copy_`."""
    if not (can_store_kv(k, k_cache) and can_store_kv(v, v_cache)):
        store_kv_index_copy(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
        return
    slots = slot_mapping.to(torch.int64).contiguous()
    if k_scale is None:
        getattr(load(), f"store_kv_{_SUFFIX[k.dtype]}")(
            k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0), slots.data_ptr(), k.shape[0], k.shape[1] * k.shape[2],
            k_cache.data_ptr(), v_cache.data_ptr(),
        )
        return
    getattr(load(), f"store_kv_{_SUFFIX[k.dtype]}_{format_of(k_cache.dtype)}")(
        k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0), slots.data_ptr(), k.shape[0], k.shape[1], k.shape[2],
        k_scale.shape[2], k_cache.data_ptr(), v_cache.data_ptr(), k_scale.data_ptr(), v_scale.data_ptr(),
    )


def paged_attention_cpu(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    split_len: int = SPLIT_LEN,
    sliding_window: int | None = None,
    lse: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same contract as `paged_attention_reference`. With a sliding window a decode reads only its last
    `sliding_window` keys' blocks, and a prefill tile only from its first query's window on."""
    lib = load()
    assert lib is not None, "the CPU attention kernel is not available"
    q = q.contiguous()
    out = torch.empty_like(q)
    tables = meta.block_tables.to(torch.int64).contiguous()
    lens = meta.seq_lens.to(torch.int64).contiguous()
    qsl = meta.query_start_loc.to(torch.int64).contiguous()
    rest = (tables.data_ptr(), tables.shape[1], lens.data_ptr(), qsl.data_ptr(), lens.shape[0], q.shape[1],
            k_cache.shape[2], q.shape[2], k_cache.shape[1], scale, QUERY_TILE, split_len, sliding_window or 0,
            torch.get_num_threads(), out.data_ptr(), None if lse is None else lse.data_ptr())
    if k_scale is None:
        getattr(lib, f"paged_attention_{_SUFFIX[q.dtype]}")(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), *rest)
    else:
        getattr(lib, f"paged_attention_{_SUFFIX[q.dtype]}_{format_of(k_cache.dtype)}")(
            q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), k_scale.data_ptr(), v_scale.data_ptr(), *rest
        )
    return out


class CpuBackend:
    """The C++ kernels as an `AttentionBackend`: `store_kv` and `paged_attention_cpu`."""

    name = "cpu"
    store_kv = staticmethod(store_kv)
    attend = staticmethod(paged_attention_cpu)
