"""Reference attention: gather each sequence's blocks into a contiguous K/V and call SDPA.

Slow (it copies the whole context every step) and obviously right: the oracle
the fast backends are tested against. Decodes are batched into one SDPA call
with a length mask; each prefill chunk gets its own call with a causal mask
shifted by its cached context length. A layer with a sliding window (attention/sliding_window.py)
masks the keys that left it too; they are still gathered (their blocks may be freed and reused
by then: read, but never weighed). New K/V go into the cache by `index_copy_`
(`store_kv_index_copy`, which the Triton backend uses too). An int8 / fp8 cache is written through
`kv_quant.quantize` and read back through `kv_quant.dequantize`, gathered rows only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvserve.attention.kv_quant import dequantize, format_of, quantize
from kvserve.attention.metadata import AttentionMetadata


def store_kv_index_copy(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
) -> None:
    """k_cache/v_cache rows `slot_mapping` = k, v ([T, Hkv, D]), on any device and in any dtype; into an
    int8 / fp8 cache quantized, with their scales written to k_scale / v_scale ([blocks, Hkv, block_size])."""
    if k_scale is None:
        k_cache.view(-1, *k.shape[1:]).index_copy_(0, slot_mapping, k)
        v_cache.view(-1, *v.shape[1:]).index_copy_(0, slot_mapping, v)
        return
    block_size = k_scale.shape[2]
    blocks, offsets = slot_mapping // block_size, slot_mapping % block_size
    for x, cache, scales in ((k, k_cache, k_scale), (v, v_cache, v_scale)):
        values, row_scales = quantize(x, format_of(cache.dtype))
        # index_copy_ has no fp8 kernel: copy the bytes
        cache.view(torch.uint8).view(-1, *x.shape[1:]).index_copy_(0, slot_mapping, values.view(torch.uint8))
        scales[blocks, :, offsets] = row_scales


def _rows(cache: torch.Tensor, scales: torch.Tensor | None, table: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The cache's blocks `table` ([..., n]) as [..., n, block_size, Hkv, D] of `dtype`, dequantized where
    the cache is int8 / fp8."""
    if scales is None:
        return cache[table]
    return dequantize(cache[table], scales[table].transpose(-1, -2), dtype)


def _log_sum_exp(q: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """log sum_j exp(scale q.k_j) over the keys `mask` lets each query see: q [..., Hq, Lq, D], keys
    [..., Hkv, L, D], mask broadcastable to [..., Hq, Lq, L] -> [..., Hq, Lq] fp32."""
    keys = keys.repeat_interleave(q.shape[-3] // keys.shape[-3], dim=-3)
    scores = (q.float() @ keys.float().transpose(-1, -2)) * scale
    return torch.logsumexp(scores.masked_fill(~mask, float("-inf")), dim=-1)


def paged_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    sliding_window: int | None = None,
    lse: torch.Tensor | None = None,
) -> torch.Tensor:
    """q: [T, Hq, D]; caches: [num_blocks, block_size, Hkv, D] -> out [T, Hq, D]. For an int8 / fp8 cache
    k_scale, v_scale: [num_blocks, Hkv, block_size] fp32. With `sliding_window` W the query at position
    i sees the keys at positions i - W < j <= i only. `lse` ([T, Hq] fp32), when given, receives each
    row's log-sum-exp of its scaled scores (attention sinks merge with it: attention/attention_sinks.py)."""
    out = torch.empty_like(q)
    bs = meta.block_size
    nd = meta.num_decodes
    gqa = q.shape[1] != k_cache.shape[2]
    if nd:
        max_len = meta.max_decode_seq_len
        tables = meta.block_tables[:nd, : -(-max_len // bs)]
        keys = _rows(k_cache, k_scale, tables, q.dtype).flatten(1, 2)[:, :max_len].transpose(1, 2)  # [nd, Hkv, L, D]
        values = _rows(v_cache, v_scale, tables, q.dtype).flatten(1, 2)[:, :max_len].transpose(1, 2)
        keys_at = torch.arange(max_len, device=q.device)[None, :]
        mask = keys_at < meta.seq_lens[:nd, None]
        if sliding_window is not None:
            mask &= keys_at >= meta.seq_lens[:nd, None] - sliding_window
        o = F.scaled_dot_product_attention(
            q[:nd].unsqueeze(2), keys, values, attn_mask=mask[:, None, None, :], scale=scale, enable_gqa=gqa
        )
        out[:nd] = o.squeeze(2)
        if lse is not None:
            lse[:nd] = _log_sum_exp(q[:nd].unsqueeze(2), keys, mask[:, None, None, :], scale).squeeze(2)
    qsl, lens = meta.query_start_loc_cpu, meta.seq_lens_cpu
    for i in range(nd, meta.num_seqs):
        start, end, seq_len = qsl[i], qsl[i + 1], lens[i]
        context = seq_len - (end - start)
        table = meta.block_tables[i, : -(-seq_len // bs)]
        keys = _rows(k_cache, k_scale, table, q.dtype).flatten(0, 1)[:seq_len].transpose(0, 1)  # [Hkv, L, D]
        values = _rows(v_cache, v_scale, table, q.dtype).flatten(0, 1)[:seq_len].transpose(0, 1)
        positions = torch.arange(context, seq_len, device=q.device)
        keys_at = torch.arange(seq_len, device=q.device)[None, :]
        mask = keys_at <= positions[:, None]
        if sliding_window is not None:
            mask &= keys_at > positions[:, None] - sliding_window
        o = F.scaled_dot_product_attention(
            q[start:end].transpose(0, 1), keys, values, attn_mask=mask, scale=scale, enable_gqa=gqa
        )
        out[start:end] = o.transpose(0, 1)
        if lse is not None:
            lse[start:end] = _log_sum_exp(q[start:end].transpose(0, 1), keys, mask, scale).transpose(0, 1)
    return out


class ReferenceBackend:
    """The oracle as an `AttentionBackend`: index_copy_ and gather + SDPA, for caches of every
    `--kv-cache-dtype`."""

    name = "reference"
    store_kv = staticmethod(store_kv_index_copy)
    attend = staticmethod(paged_attention_reference)
