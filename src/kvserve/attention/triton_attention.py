"""GPU paged attention in Triton: flash-attention for prefill chunks, flash-decoding for decodes.

Same contract as `paged_attention_reference` (see reference.py and metadata.py): q is the flat
batch [T, Hq, D], the caches are [num_blocks, block_size, Hkv, D], the first `meta.num_decodes`
sequences are one-token decodes and the rest are prefill chunks whose queries sit at the end of
their `seq_lens[i]` keys. Both kernels read K/V in place: a key at position n of sequence s lives
in block `block_tables[s, n // block_size]` at offset `n % block_size`, so every key tile is a
gather of rows through the block table, never a copy of the context into a contiguous buffer.
GQA/MQA never repeat K/V: query head h reads kv head `h // group` (group = Hq // Hkv).

Prefill (`_prefill_kernel`, flash-attention). One program per (prefill sequence, tile of BLOCK_M
queries, query head). It keeps its Q tile in registers and walks the keys in tiles of BLOCK_N,
holding only a running row maximum m, a running denominator l and an unnormalised fp32
accumulator (the online softmax): for each tile S = Q Kᵀ·scale, m' = max(m, rowmax S),
P = exp(S - m'), l = l·exp(m - m') + rowsum P, acc = acc·exp(m - m') + P V; at the end
out = acc / l. Exponentials are base 2 with log2(e) folded into the scale. The causal mask is
shifted by the cached context (query i of a chunk sits at position context + i), so keys are
walked in two phases: tiles that lie wholly before the tile's first query need no mask, and only
the tiles on the diagonal (and the ragged end) pay for one. Tiles past the last visible key are
never visited. The varlen batch has no padding: programs whose query tile lies beyond their
sequence's chunk return at once.

Decode (`_decode_partition_kernel` + `_decode_reduce_kernel`, flash-decoding). A decode has one
query per head, so one program per sequence would leave most of the GPU idle on long contexts.
Instead the keys of each sequence are split into partitions of PARTITION_SIZE positions and one
program per (decode sequence, kv head, partition) runs the same online softmax over its
partition. It handles all query heads of the kv head's GQA group at once (a [BLOCK_H, D] query
tile, padded to 16 rows for tensor-core dots), so each K/V row is loaded once per group. Each
program writes its normalised partial output o_p and its log-sum-exp lse_p = m_p + log2(l_p); the
reduce kernel merges them: with M = max_p lse_p and w_p = 2^(lse_p - M),
out = Σ w_p·o_p / Σ w_p — exactly softmax over all keys. It walks the partitions in chunks with
the same running-max rescaling, so any context length fits. When every decode fits in a single
partition the first kernel writes the final output directly and the reduction is skipped.

Sliding window (`sliding_window` W): the query at position i sees keys i - W < j <= i only. A
decode's partitions start at its window (seq_len - W), so it reads W keys at most; a prefill tile
starts at its first query's window, masks the tiles on the window's edge (different rows start at
different keys) as it masks the diagonal, and leaves the tiles wholly inside every row's window
unmasked. Keys before the tile's first window are never loaded: their blocks may have been freed.
A tile where a row sees no key yet keeps its running max at -inf and shifts by 0, so no -inf - -inf.

Accumulation is fp32 whatever the input dtype (fp32, bf16, fp16); fp32 inputs use IEEE fp32
dots (not TF32) so results match the reference. head_dim may be any size: tiles are padded to a
power of two (BLOCK_D) and masked.

Triton is optional: import this module only when `triton` imports (the selector checks). Tested
on CPU under the Triton interpreter (TRITON_INTERPRET=1, set before this module is imported,
since `@triton.jit` decides at decoration time whether to interpret); the interpreter cannot do
bf16 arithmetic, so there only, bf16 dot operands are widened to fp32 (see `_dot_options`). Tile
sizes, warps and pipeline stages for 16-bit inputs (`prefill_config`, `decode_config`) are the
fastest of a sweep on an H200 (`benchmarks/triton_attention.py --sweep`, docs/PERFORMANCE.md); fp32
and head_dim > 128 keep the smaller tiles chosen from ptxas's register and spill report for sm_80/90.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kvserve.attention.metadata import AttentionMetadata
from kvserve.attention.reference import store_kv_index_copy

PARTITION_SIZE = 512  # keys per flash-decoding partition (a multiple of DECODE_BLOCK_N)
DECODE_BLOCK_N = 128  # keys per tile in the decode kernel (head_dim <= 128)
REDUCE_BLOCK_P = 32  # partitions merged per step of the reduce kernel
MIN_DOT_ROWS = 16  # tl.dot needs at least 16 rows on tensor cores
LOG2E = 1.4426950408889634
# Whether @triton.jit below makes interpreted (CPU, numpy) kernels: TRITON_INTERPRET=1 at import.
_INTERPRETED = bool(triton.knobs.runtime.interpret) if hasattr(triton, "knobs") else os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """a @ b with fp32 accumulation; UPCAST computes it in fp32 (the interpreter's bf16 workaround)."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=DOT_PRECISION)


@triton.jit
def _key_slots(block_table_ptr, offs_n, mask_n, block_size):
    """(block id, offset in the block), both int64, of key positions `offs_n` (this sequence's row of the table)."""
    block_ids = tl.load(block_table_ptr + offs_n // block_size, mask=mask_n, other=0).to(tl.int64)
    return block_ids, (offs_n % block_size).to(tl.int64)


@triton.jit
def _load_kv(base, block_ids, in_block, offs_d, kv_mask, stride_b, stride_s, compute_dtype, KV_FORMAT: tl.constexpr):
    """A tile of K or V rows [BLOCK_N, BLOCK_D] from a [blocks, block_size, Hkv, D] cache, as `compute_dtype`
    values (before their scales, `_load_scales`).

    KV_FORMAT 0: the model's dtype, read as is. 1: int8. 2: fp8 e4m3, passed as its bytes: sign, exponent
    and mantissa moved into fp16's places make a valid fp16 (bias 15 instead of 7, subnormals included)
    equal to the value / 256 — the CPU kernel's trick, the same in the interpreter as compiled."""
    x = tl.load(base + (block_ids * stride_b + in_block * stride_s)[:, None] + offs_d[None, :], mask=kv_mask, other=0)
    if KV_FORMAT == 1:
        x = x.to(tl.float32).to(compute_dtype)
    elif KV_FORMAT == 2:
        bits = x.to(tl.uint16)
        x = (((bits & 0x80) << 8) | ((bits & 0x7F) << 7)).to(tl.float16, bitcast=True).to(compute_dtype)
    return x


@triton.jit
def _load_scales(scale_base, block_ids, in_block, stride_sb, mask_n, KV_FORMAT: tl.constexpr):
    """The [BLOCK_N] scales of an int8 / fp8 cache's rows (fp8's include the 256 that `_load_kv` leaves out)."""
    scale = tl.load(scale_base + block_ids * stride_sb + in_block, mask=mask_n, other=0.0)
    if KV_FORMAT == 2:
        scale = scale * 256.0
    return scale


@triton.jit
def _prefill_tile(
    acc,
    l_i,
    m_i,
    q,
    k_base,
    v_base,
    k_scale_base,  # this kv head's scales of an int8 / fp8 cache (unused for KV_FORMAT 0)
    v_scale_base,
    table_ptr,
    start_n,
    key_lo,  # the first key any row of the tile sees (0 without a window)
    seq_len,
    window,  # 0: no sliding window
    q_pos,
    offs_d,
    mask_d,
    qk_scale,
    block_size,
    stride_kb,
    stride_ks,
    stride_vb,
    stride_vs,
    stride_sb,
    BLOCK_N: tl.constexpr,
    CAUSAL_MASK: tl.constexpr,
    KV_FORMAT: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One step of the online softmax: fold keys start_n .. start_n+BLOCK_N into (acc, l_i, m_i)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    mask_n = (offs_n < seq_len) & (offs_n >= key_lo)
    kv_mask = mask_n[:, None] & mask_d[None, :]
    block_ids, in_block = _key_slots(table_ptr, offs_n, mask_n, block_size)
    k = _load_kv(k_base, block_ids, in_block, offs_d, kv_mask, stride_kb, stride_ks, q.dtype, KV_FORMAT)
    s = _dot(q, tl.trans(k), UPCAST, DOT_PRECISION) * qk_scale
    if KV_FORMAT != 0:
        s = s * _load_scales(k_scale_base, block_ids, in_block, stride_sb, mask_n, KV_FORMAT)[None, :]  # q.(s k) = s (q.k): one multiply per score, not per element
    if CAUSAL_MASK:
        visible = (offs_n[None, :] <= q_pos[:, None]) & mask_n[None, :]
        visible = visible & ((window == 0) | (offs_n[None, :] > q_pos[:, None] - window))
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_shift = m_new
    if CAUSAL_MASK:
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen no key yet
    alpha = tl.exp2(m_i - m_shift)
    p = tl.exp2(s - m_shift[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = _load_kv(v_base, block_ids, in_block, offs_d, kv_mask, stride_vb, stride_vs, q.dtype, KV_FORMAT)
    if KV_FORMAT != 0:
        p = p * _load_scales(v_scale_base, block_ids, in_block, stride_sb, mask_n, KV_FORMAT)[None, :]  # on its weight
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, UPCAST, DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def _prefill_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    out_ptr,
    k_scale_ptr,  # [blocks, Hkv, block_size] fp32 of an int8 / fp8 cache; any tensor for KV_FORMAT 0
    v_scale_ptr,
    lse_ptr,  # [T, Hq] fp32: each row's natural log-sum-exp (WRITE_LSE)
    block_tables_ptr,
    seq_lens_ptr,
    query_start_loc_ptr,
    first_seq,  # index of the first prefill sequence (= num_decodes)
    qk_scale,  # softmax scale * log2(e)
    window,  # sliding window; 0: none
    group,  # query heads per kv head
    head_dim,
    block_size,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_ot,
    stride_oh,
    stride_bt,
    stride_sb,  # scales: per block (kv heads are block_size apart, offsets adjacent)
    stride_sh,
    stride_lt,  # lse: per row (heads adjacent)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    KV_FORMAT: tl.constexpr,
    WRITE_LSE: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    seq = first_seq + tl.program_id(0)
    tile = tl.program_id(1)
    head = tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    if tile * BLOCK_M >= q_len:
        return  # this sequence's chunk is shorter than the longest one in the batch
    seq_len = tl.load(seq_lens_ptr + seq)
    context = seq_len - q_len  # keys cached before this chunk
    kv_head = head // group

    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < q_len
    mask_d = offs_d < head_dim
    q_rows = (q_start + offs_m).to(tl.int64)
    q = tl.load(
        q_ptr + q_rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
        mask=mask_m[:, None] & mask_d[None, :],
        other=0.0,
    )
    q_pos = context + offs_m  # absolute position of each query

    k_base = k_cache_ptr + kv_head * stride_kh
    v_base = v_cache_ptr + kv_head * stride_vh
    k_scale_base = k_scale_ptr + kv_head * stride_sh
    v_scale_base = v_scale_ptr + kv_head * stride_sh
    table_ptr = block_tables_ptr + seq.to(tl.int64) * stride_bt
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    first_q_pos = context + tile * BLOCK_M
    last_q_pos = context + tl.minimum((tile + 1) * BLOCK_M, q_len) - 1
    diagonal = (first_q_pos // BLOCK_N) * BLOCK_N
    # Without a window every row sees keys from 0 on; with one, from the tile's first window, and the tiles
    # before `inside` hold keys some row's window has left (the window's edge).
    has_window = window > 0
    key_lo = tl.where(has_window, tl.maximum(first_q_pos - window + 1, 0), 0)
    start = (key_lo // BLOCK_N) * BLOCK_N
    edge_end = tl.cdiv(tl.maximum(last_q_pos - window + 1, 0), BLOCK_N) * BLOCK_N
    inside = tl.where(has_window, tl.maximum(tl.minimum(edge_end, diagonal), start), 0)
    # Phase 1: the window's edge, masked.
    for start_n in range(start, inside, BLOCK_N):
        acc, l_i, m_i = _prefill_tile(
            acc, l_i, m_i, q, k_base, v_base, k_scale_base, v_scale_base, table_ptr, start_n, key_lo, seq_len, window,
            q_pos, offs_d, mask_d, qk_scale, block_size, stride_kb, stride_ks, stride_vb, stride_vs, stride_sb,
            BLOCK_N, True, KV_FORMAT, UPCAST, DOT_PRECISION,
        )
    # Phase 2: key tiles inside every row's window and wholly before this tile's first query: no mask.
    for start_n in range(inside, diagonal, BLOCK_N):
        acc, l_i, m_i = _prefill_tile(
            acc, l_i, m_i, q, k_base, v_base, k_scale_base, v_scale_base, table_ptr, start_n, key_lo, seq_len, window,
            q_pos, offs_d, mask_d, qk_scale, block_size, stride_kb, stride_ks, stride_vb, stride_vs, stride_sb,
            BLOCK_N, False, KV_FORMAT, UPCAST, DOT_PRECISION,
        )
    # Phase 3: the diagonal, up to the last key the tile's last valid query may see.
    for start_n in range(diagonal, last_q_pos + 1, BLOCK_N):
        acc, l_i, m_i = _prefill_tile(
            acc, l_i, m_i, q, k_base, v_base, k_scale_base, v_scale_base, table_ptr, start_n, key_lo, seq_len, window,
            q_pos, offs_d, mask_d, qk_scale, block_size, stride_kb, stride_ks, stride_vb, stride_vs, stride_sb,
            BLOCK_N, True, KV_FORMAT, UPCAST, DOT_PRECISION,
        )
    # Every valid row saw its own key, so l_i > 0; a padding row past the chunk may have seen none (never stored).
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(
        out_ptr + q_rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=mask_m[:, None] & mask_d[None, :],
    )
    if WRITE_LSE:
        tl.store(lse_ptr + q_rows * stride_lt + head, (m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0))) * 0.6931471805599453,
                 mask=mask_m)  # ln 2; padding rows saw no key


@triton.jit
def _decode_partition_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    out_ptr,
    part_out_ptr,  # [num_decodes, Hq, max_partitions, BLOCK_D] fp32
    part_lse_ptr,  # [num_decodes, Hq, max_partitions] fp32, base-2 log-sum-exp
    k_scale_ptr,  # as in _prefill_kernel
    v_scale_ptr,
    lse_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    qk_scale,
    window,  # sliding window; 0: none
    group,
    head_dim,
    block_size,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_ot,
    stride_oh,
    stride_bt,
    stride_pt,  # part_out: per sequence
    stride_ph,  # part_out: per head (partitions are BLOCK_D apart)
    stride_lt,  # part_lse: per sequence
    stride_lh,  # part_lse: per head (partitions are adjacent)
    stride_sb,
    stride_sh,
    stride_rt,  # lse: per row
    PARTITION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SINGLE_PARTITION: tl.constexpr,
    KV_FORMAT: tl.constexpr,
    WRITE_LSE: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    part = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    first_key = tl.where(window > 0, tl.maximum(seq_len - window, 0), 0)  # partitions start at the window
    start = first_key + part * PARTITION
    if start >= seq_len:
        return  # this sequence has fewer keys than the longest decode in the batch
    end = tl.minimum(start + PARTITION, seq_len)

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask_h = offs_h < group
    mask_d = offs_d < head_dim
    heads = kv_head * group + offs_h  # the GQA group's query heads (rows past `group` are padding)
    q = tl.load(
        q_ptr + seq.to(tl.int64) * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
        mask=mask_h[:, None] & mask_d[None, :],
        other=0.0,
    )
    k_base = k_cache_ptr + kv_head * stride_kh
    v_base = v_cache_ptr + kv_head * stride_vh
    k_scale_base = k_scale_ptr + kv_head * stride_sh
    v_scale_base = v_scale_ptr + kv_head * stride_sh
    table_ptr = block_tables_ptr + seq.to(tl.int64) * stride_bt
    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        kv_mask = mask_n[:, None] & mask_d[None, :]
        block_ids, in_block = _key_slots(table_ptr, offs_n, mask_n, block_size)
        k = _load_kv(k_base, block_ids, in_block, offs_d, kv_mask, stride_kb, stride_ks, q.dtype, KV_FORMAT)
        s = _dot(q, tl.trans(k), UPCAST, DOT_PRECISION) * qk_scale
        if KV_FORMAT != 0:
            s = s * _load_scales(k_scale_base, block_ids, in_block, stride_sb, mask_n, KV_FORMAT)[None, :]
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_kv(v_base, block_ids, in_block, offs_d, kv_mask, stride_vb, stride_vs, q.dtype, KV_FORMAT)
        if KV_FORMAT != 0:
            p = p * _load_scales(v_scale_base, block_ids, in_block, stride_sb, mask_n, KV_FORMAT)[None, :]
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, UPCAST, DOT_PRECISION)
        m_i = m_new

    out = acc / l_i[:, None]
    mask_out = mask_h[:, None] & mask_d[None, :]
    if SINGLE_PARTITION:
        tl.store(
            out_ptr + seq.to(tl.int64) * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=mask_out,
        )
        if WRITE_LSE:
            tl.store(lse_ptr + seq.to(tl.int64) * stride_rt + heads, (m_i + tl.log2(l_i)) * 0.6931471805599453, mask=mask_h)
    else:
        part_base = seq.to(tl.int64) * stride_pt + heads * stride_ph + part * BLOCK_D
        tl.store(part_out_ptr + part_base[:, None] + offs_d[None, :], out, mask=mask_out)
        lse_base = seq.to(tl.int64) * stride_lt + heads * stride_lh + part
        tl.store(part_lse_ptr + lse_base, m_i + tl.log2(l_i), mask=mask_h)


@triton.jit
def _decode_reduce_kernel(
    out_ptr,
    part_out_ptr,
    part_lse_ptr,
    lse_ptr,
    seq_lens_ptr,
    window,
    head_dim,
    stride_ot,
    stride_oh,
    stride_pt,
    stride_ph,
    stride_lt,
    stride_lh,
    stride_rt,
    PARTITION: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
    WRITE_LSE: tl.constexpr,
):
    """Merge one (sequence, head)'s partition outputs, weighting each by 2^(lse_p - max lse)."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + seq)
    num_keys = tl.where(window > 0, tl.minimum(seq_len, window), seq_len)
    num_parts = tl.cdiv(num_keys, PARTITION)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < head_dim
    part_base = seq.to(tl.int64) * stride_pt + head * stride_ph
    lse_base = seq.to(tl.int64) * stride_lt + head * stride_lh

    running_max = tl.full([], float("-inf"), dtype=tl.float32)
    denom = tl.zeros([], dtype=tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for p0 in range(0, num_parts, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        mask_p = offs_p < num_parts
        lse = tl.load(part_lse_ptr + lse_base + offs_p, mask=mask_p, other=float("-inf"))
        new_max = tl.maximum(running_max, tl.max(lse, 0))
        alpha = tl.exp2(running_max - new_max)
        weights = tl.exp2(lse - new_max)  # 0 for the masked partitions
        o = tl.load(
            part_out_ptr + part_base + offs_p[:, None] * BLOCK_D + offs_d[None, :],
            mask=mask_p[:, None] & mask_d[None, :],
            other=0.0,
        )
        acc = acc * alpha + tl.sum(weights[:, None] * o, 0)
        denom = denom * alpha + tl.sum(weights, 0)
        running_max = new_max
    tl.store(
        out_ptr + seq.to(tl.int64) * stride_ot + head * stride_oh + offs_d,
        (acc / denom).to(out_ptr.dtype.element_ty),
        mask=mask_d,
    )
    if WRITE_LSE:
        tl.store(lse_ptr + seq.to(tl.int64) * stride_rt + head, (running_max + tl.log2(denom)) * 0.6931471805599453)


def _dot_options(dtype: torch.dtype) -> dict[str, object]:
    """The kernels' dot settings for this input dtype.

    fp32 inputs use IEEE fp32 dots (TF32 would lose ~3 digits against the reference); 16-bit
    inputs go to the tensor cores as they are. The Triton interpreter cannot do arithmetic on
    bf16 (it stores bf16 as raw uint16 bits, and its tl.dot multiplies those bits), so under the
    interpreter bf16 dot operands are converted to fp32 first; compiled kernels never do that.
    """
    upcast = _INTERPRETED and dtype == torch.bfloat16
    return {"UPCAST": upcast, "DOT_PRECISION": "ieee" if dtype == torch.float32 or upcast else "tf32"}


def prefill_config(dtype: torch.dtype, head_dim: int, max_query_len: int) -> dict[str, object]:
    """Tile sizes, warps and pipeline stages of the prefill kernel (constexprs plus launch options).

    16-bit inputs up to head_dim 128: 128 x 128 tiles, 8 warps, 2 stages, the fastest of 24 variants
    on an H200 (4 chunks of 2,048 tokens, GQA 32:8, head_dim 128: 0.68 ms against 1.09 for the 64 x 32
    tiles before; docs/PERFORMANCE.md). fp32 (IEEE dots, twice the registers) and wider heads keep
    tiles that ptxas compiles without spills for sm_80/90. Short chunks get a smaller query tile.
    """
    block_d = max(16, triton.next_power_of_2(head_dim))
    if dtype != torch.float32 and block_d <= 128:
        block_m = min(128, max(16, triton.next_power_of_2(max_query_len)))
        return {"BLOCK_M": block_m, "BLOCK_N": 128 if block_m == 128 else 64, "BLOCK_D": block_d,
                "num_warps": 8 if block_m >= 64 else 4, "num_stages": 2, **_dot_options(dtype)}
    block_m = min(64, max(16, triton.next_power_of_2(max_query_len)))
    block_n = 32 if block_d <= 128 else 16
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_D": block_d, "num_warps": 8 if block_m == 64 else 4, **_dot_options(dtype)}


def decode_config(dtype: torch.dtype, head_dim: int, group: int, max_partitions: int, partition_size: int) -> dict[str, object]:
    """Tile sizes, warps and pipeline stages of the decode kernel: tiles of 128 keys, 4 warps, 2 stages,
    the fastest of 48 variants on an H200 (with 512-key partitions: 64 decodes of 4,096 keys in
    0.28 ms, 1.12x the KV-read floor, against 0.45 ms for 64-key tiles, 8 warps and 256-key partitions)."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_n = min(DECODE_BLOCK_N if block_d <= 128 else 32, partition_size)
    return {
        "PARTITION": partition_size,
        "BLOCK_N": block_n,
        "BLOCK_H": max(MIN_DOT_ROWS, triton.next_power_of_2(group)),
        "BLOCK_D": block_d,
        "SINGLE_PARTITION": max_partitions == 1,
        "num_warps": 4 if block_d <= 128 else 8,
        "num_stages": 2,
        **_dot_options(dtype),
    }


@dataclass(frozen=True)
class _CacheFormat:
    """What the kernels read besides q and the caches: the scales of an int8 / fp8 cache and where `lse` goes;
    unused pointers are any tensor (their kernels' branches are compiled out)."""

    kv_format: int  # the kernels' KV_FORMAT: 0 the model's dtype, 1 int8, 2 fp8 e4m3 (read as bytes)
    k_scale: torch.Tensor
    v_scale: torch.Tensor
    lse: torch.Tensor | None

    @property
    def scale_strides(self) -> tuple[int, int]:
        return self.k_scale.stride(0), self.k_scale.stride(1)

    def lse_args(self, fallback: torch.Tensor) -> tuple[torch.Tensor, int]:
        return (fallback, 0) if self.lse is None else (self.lse, self.lse.stride(0))


def _prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor,
             meta: AttentionMetadata, qk_scale: float, window: int, fmt: _CacheFormat) -> None:
    nd = meta.num_decodes
    qsl = meta.query_start_loc_cpu
    max_query_len = max(qsl[i + 1] - qsl[i] for i in range(nd, meta.num_seqs))
    config = prefill_config(q.dtype, q.shape[2], max_query_len)
    num_heads, num_kv_heads = q.shape[1], k_cache.shape[2]
    lse, stride_lse = fmt.lse_args(out)
    grid = (meta.num_seqs - nd, triton.cdiv(max_query_len, config["BLOCK_M"]), num_heads)
    _prefill_kernel[grid](
        q, k_cache, v_cache, out, fmt.k_scale, fmt.v_scale, lse, meta.block_tables, meta.seq_lens, meta.query_start_loc,
        nd, qk_scale, window, num_heads // num_kv_heads, q.shape[2], meta.block_size,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(1), meta.block_tables.stride(0), *fmt.scale_strides, stride_lse,
        KV_FORMAT=fmt.kv_format, WRITE_LSE=fmt.lse is not None, **config,
    )


def _decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor,
            meta: AttentionMetadata, qk_scale: float, partition_size: int, window: int, fmt: _CacheFormat) -> None:
    nd = meta.num_decodes
    num_heads, num_kv_heads = q.shape[1], k_cache.shape[2]
    max_keys = min(meta.max_decode_seq_len, window) if window else meta.max_decode_seq_len
    max_parts = triton.cdiv(max_keys, partition_size)
    config = decode_config(q.dtype, q.shape[2], num_heads // num_kv_heads, max_parts, partition_size)
    block_d = config["BLOCK_D"]
    # Partials are only written when some decode spans several partitions.
    parts = 1 if config["SINGLE_PARTITION"] else max_parts
    part_out = torch.empty((nd, num_heads, parts, block_d), dtype=torch.float32, device=q.device)
    part_lse = torch.empty((nd, num_heads, parts), dtype=torch.float32, device=q.device)
    lse, stride_lse = fmt.lse_args(out)
    _decode_partition_kernel[(nd, num_kv_heads, max_parts)](
        q, k_cache, v_cache, out, part_out, part_lse, fmt.k_scale, fmt.v_scale, lse, meta.block_tables, meta.seq_lens,
        qk_scale, window, num_heads // num_kv_heads, q.shape[2], meta.block_size,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(1), meta.block_tables.stride(0),
        part_out.stride(0), part_out.stride(1), part_lse.stride(0), part_lse.stride(1), *fmt.scale_strides, stride_lse,
        KV_FORMAT=fmt.kv_format, WRITE_LSE=fmt.lse is not None, **config,
    )
    if not config["SINGLE_PARTITION"]:
        _decode_reduce_kernel[(nd, num_heads)](
            out, part_out, part_lse, lse, meta.seq_lens, window, q.shape[2],
            out.stride(0), out.stride(1), part_out.stride(0), part_out.stride(1), part_lse.stride(0), part_lse.stride(1),
            stride_lse, PARTITION=partition_size, BLOCK_P=min(REDUCE_BLOCK_P, triton.next_power_of_2(max_parts)),
            BLOCK_D=block_d, WRITE_LSE=fmt.lse is not None, num_warps=4,
        )


def paged_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    *,
    partition_size: int = PARTITION_SIZE,
    sliding_window: int | None = None,
    lse: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same contract as `paged_attention_reference`: q [T, Hq, D]; caches [blocks, block_size, Hkv, D] in the
    model's dtype, or int8 / fp8 e4m3 with their scales k_scale, v_scale [blocks, Hkv, block_size] fp32; each
    query sees its last `sliding_window` keys only when given; each row's log-sum-exp into `lse` [T, Hq] fp32
    when given.

    `partition_size` (keys per flash-decoding partition) must be a power of two >= 16.
    """
    if partition_size < 16 or partition_size & (partition_size - 1):
        raise ValueError(f"partition_size must be a power of two >= 16, got {partition_size}")
    num_heads, num_kv_heads = q.shape[1], k_cache.shape[2]
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads cannot share {num_kv_heads} kv heads")
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("the KV caches' head_dim must be contiguous")
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # contiguous, whatever q's strides
    if q.shape[0] == 0:
        return out
    kv_format = {torch.int8: 1, torch.float8_e4m3fn: 2}.get(k_cache.dtype, 0)
    if kv_format:
        if k_scale is None or v_scale is None or k_scale.stride(-1) != 1 or v_scale.stride() != k_scale.stride():
            raise ValueError("an int8 / fp8 cache needs k_scale and v_scale [blocks, Hkv, block_size] with the same strides")
        if kv_format == 2:  # the kernels widen fp8 from its bytes
            k_cache, v_cache = k_cache.view(torch.uint8), v_cache.view(torch.uint8)
    if lse is not None and lse.stride(-1) != 1:
        raise ValueError("lse's heads must be contiguous")
    fmt = _CacheFormat(kv_format, k_scale if kv_format else k_cache, v_scale if kv_format else v_cache, lse)
    qk_scale = scale * LOG2E
    window = sliding_window or 0
    if meta.num_decodes:
        _decode(q, k_cache, v_cache, out, meta, qk_scale, partition_size, window, fmt)
    if meta.num_seqs > meta.num_decodes:
        _prefill(q, k_cache, v_cache, out, meta, qk_scale, window, fmt)
    return out


class TritonBackend:
    """The Triton kernels as an `AttentionBackend`; K/V are stored by `index_copy_` (quantized by torch for an
    int8 / fp8 cache, as the reference backend stores them)."""

    name = "triton"
    store_kv = staticmethod(store_kv_index_copy)
    attend = staticmethod(paged_attention_triton)
