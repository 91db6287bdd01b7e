"""Every attention backend gives the reference backend's results on random paged caches."""

from __future__ import annotations


import pytest
import torch

from kvserve.attention import cpu
from kvserve.attention.kv_cache import KVCache
from kvserve.attention.random_batch import random_paged_batch as make_batch  # also used by the kernel tests
from kvserve.attention.reference import ReferenceBackend, paged_attention_reference
from kvserve.layers.attention import Attention


CASES = [
    # (query lens, seq lens): decodes first, then prefill chunks (some with a cached prefix)
    ([1], [1]),
    ([1, 1, 1], [5, 600, 1100]),
    ([1, 1, 7, 40], [3, 20, 7, 100]),
    ([33], [33]),
    ([1, 64], [1500, 200]),
    ([5, 17], [70, 17]),
    ([1, 100], [40, 1300]),  # a chunk over a 1,200-token cached prefix: three spans of 512 keys
]


@pytest.fixture(scope="module")
def kernel():
    if cpu.load() is None:
        pytest.skip("the CPU attention kernel could not be built here (no g++?)")
    return cpu


@pytest.mark.parametrize("query_lens, seq_lens", CASES)
@pytest.mark.parametrize("heads", [(4, 4), (7, 1), (9, 3)], ids=["mha", "mqa", "gqa"])
@pytest.mark.parametrize("block_size", [1, 16])
def test_cpu_kernel_matches_reference_fp32(kernel, query_lens, seq_lens, heads, block_size):
    q, k, v, meta = make_batch(query_lens, seq_lens, heads[0], heads[1], 64, block_size, torch.float32)
    expected = paged_attention_reference(q, k, v, meta, 0.125)
    for split_len in (0, 64, 512):  # 0: never split; 64: long decodes cross many split boundaries
        got = kernel.paged_attention_cpu(q, k, v, meta, 0.125, split_len=split_len)
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_kernel_half_precision(kernel, dtype):
    q, k, v, meta = make_batch([1, 1, 9], [300, 40, 30], 8, 2, 80, 16, dtype)
    expected = paged_attention_reference(q.float(), k.float(), v.float(), meta, 80**-0.5)
    got = kernel.paged_attention_cpu(q, k, v, meta, 80**-0.5, split_len=128)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), expected, atol=1e-2, rtol=1e-2)


def test_long_prefill_in_one_chunk(kernel):
    """A 2k-token prompt in one chunk: many query tiles, each walking every key block it may see."""
    q, k, v, meta = make_batch([2048], [2048], 4, 2, 64, 16, torch.float32)
    expected = paged_attention_reference(q, k, v, meta, 0.125)
    torch.testing.assert_close(kernel.paged_attention_cpu(q, k, v, meta, 0.125), expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 80, 96, 128, 256, 48])
def test_cpu_kernel_head_dims(kernel, dtype, head_dim):
    """Every head dim the vectorized kernels specialise (and one they do not: 48), with decodes
    split at key offsets that are not block-aligned, GQA 4:1, and a prefill chunk over a cached prefix."""
    q, k, v, meta = make_batch([1, 1, 37], [700, 90, 300], 8, 2, head_dim, 16, dtype, seed=head_dim)
    expected = paged_attention_reference(q.float(), k.float(), v.float(), meta, head_dim**-0.5)
    for split_len in (0, 100, 512):
        got = kernel.paged_attention_cpu(q, k, v, meta, head_dim**-0.5, split_len=split_len)
        tol = 2e-5 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(got.float(), expected, atol=tol, rtol=tol * 5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", [3, 300])  # 300: the parallel copy
def test_store_kv_writes_what_index_copy_writes(kernel, dtype, tokens):
    """K/V rows that are strided views of a fused QKV output land in their slots, and nothing else moves."""
    gen = torch.Generator().manual_seed(tokens)
    heads, kv_heads, head_dim, blocks, block_size = 6, 2, 16, 40, 16
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=gen).to(dtype)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    k, v = k.view(tokens, kv_heads, head_dim), v.view(tokens, kv_heads, head_dim)
    slots = torch.randperm(blocks * block_size, generator=gen)[:tokens]
    k_cache = torch.randn(blocks, block_size, kv_heads, head_dim, generator=gen).to(dtype)
    v_cache = torch.randn(blocks, block_size, kv_heads, head_dim, generator=gen).to(dtype)
    k_want, v_want = k_cache.clone(), v_cache.clone()
    k_want.view(-1, kv_heads, head_dim).index_copy_(0, slots, k)
    v_want.view(-1, kv_heads, head_dim).index_copy_(0, slots, v)
    assert kernel.can_store_kv(k, k_cache) and kernel.can_store_kv(v, v_cache)
    kernel.store_kv(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache, k_want) and torch.equal(v_cache, v_want)
    assert not kernel.can_store_kv(k.transpose(1, 2), k_cache)  # a token's heads not contiguous: index_copy_ instead


@pytest.mark.parametrize("backend", [ReferenceBackend(), cpu.CpuBackend()], ids=["reference", "cpu"])
def test_attention_layer_stores_then_attends_through_its_backend(kernel, backend):
    """The layer writes this step's K/V where `slot_mapping` says (a strided view of a fused QKV output
    for the C++ copy, a transposed one for its index_copy_ fallback), then attends over the cache."""
    heads, kv_heads, head_dim, block_size = 6, 2, 16, 4
    q, k_cache, v_cache, meta = make_batch([1, 3], [6, 9], heads, kv_heads, head_dim, block_size, torch.float32, seed=2)
    meta.slot_mapping = torch.tensor([int(meta.block_tables[0, 1]) * block_size + 1]
                                     + [int(meta.block_tables[1, p // block_size]) * block_size + p % block_size for p in (6, 7, 8)])
    gen = torch.Generator().manual_seed(4)
    qkv = torch.randn(4, (heads + 2 * kv_heads) * head_dim, generator=gen)
    k = qkv[:, heads * head_dim:(heads + kv_heads) * head_dim].view(4, kv_heads, head_dim)
    v = torch.randn(4, head_dim, kv_heads, generator=gen).transpose(1, 2)
    layer = Attention(heads, kv_heads, head_dim, head_dim**-0.5)
    layer.backend = backend
    k_want, v_want = k_cache.clone(), v_cache.clone()
    k_want.view(-1, kv_heads, head_dim).index_copy_(0, meta.slot_mapping, k)
    v_want.view(-1, kv_heads, head_dim).index_copy_(0, meta.slot_mapping, v)
    out = layer(q, k, v, KVCache(k_cache, v_cache), meta)
    assert torch.equal(k_cache, k_want) and torch.equal(v_cache, v_want)
    torch.testing.assert_close(out, paged_attention_reference(q, k_want, v_want, meta, head_dim**-0.5), atol=2e-5, rtol=1e-4)


def dead_blocks_poisoned(k: torch.Tensor, v: torch.Tensor, meta, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Copies of the caches with NaN in every block that lies wholly before each of its sequence's windows
    (the blocks the engine frees): a backend that reads one returns NaN."""
    k, v = k.clone(), v.clone()
    qsl, lens, bs = meta.query_start_loc_cpu, meta.seq_lens_cpu, meta.block_size
    for i, seq_len in enumerate(lens):
        first_query = seq_len - (qsl[i + 1] - qsl[i])
        dead = max(0, first_query - window + 1) // bs
        k[meta.block_tables[i, :dead]] = float("nan")
        v[meta.block_tables[i, :dead]] = float("nan")
    return k, v


def test_reference_sliding_window_is_attention_over_each_querys_last_keys():
    """The oracle against the definition: query at position p attends to keys max(0, p - W + 1) .. p."""
    q, k, v, meta = make_batch([1, 1, 9, 30], [3, 40, 9, 70], 4, 2, 16, 4, torch.float32, seed=7)
    window = 6
    got = paged_attention_reference(q, k, v, meta, 0.25, sliding_window=window)
    qsl, lens, bs = meta.query_start_loc_cpu, meta.seq_lens_cpu, meta.block_size
    for i, seq_len in enumerate(lens):
        keys = k[meta.block_tables[i, : -(-seq_len // bs)]].flatten(0, 1)[:seq_len].repeat_interleave(2, dim=1)
        values = v[meta.block_tables[i, : -(-seq_len // bs)]].flatten(0, 1)[:seq_len].repeat_interleave(2, dim=1)
        for row in range(qsl[i], qsl[i + 1]):
            p = seq_len - (qsl[i + 1] - row)
            lo = max(0, p - window + 1)
            weights = torch.softmax(torch.einsum("hd,jhd->hj", q[row], keys[lo : p + 1]) * 0.25, dim=-1)
            torch.testing.assert_close(got[row], torch.einsum("hj,jhd->hd", weights, values[lo : p + 1]))


WINDOW_CASES = [
    ([1, 1, 1], [5, 600, 1100]),  # decodes: split into slices of the window only
    ([1, 64], [1500, 200]),
    ([5, 17], [70, 17]),
    ([1, 100], [40, 1300]),
    ([700], [700]),  # many prefill tiles, each starting at its first query's window
]


@pytest.mark.parametrize("query_lens, seq_lens", WINDOW_CASES)
@pytest.mark.parametrize("window", [1, 7, 16, 300, 5000])
@pytest.mark.parametrize("heads", [(4, 4), (9, 3)], ids=["mha", "gqa"])
@pytest.mark.parametrize("block_size", [1, 16])
def test_cpu_kernel_sliding_window(kernel, query_lens, seq_lens, window, heads, block_size):
    """Equal to the reference with the same window, and reading no block before any window (they hold NaN here)."""
    q, k, v, meta = make_batch(query_lens, seq_lens, heads[0], heads[1], 64, block_size, torch.float32, seed=window)
    expected = paged_attention_reference(q, k, v, meta, 0.125, sliding_window=window)
    k, v = dead_blocks_poisoned(k, v, meta, window)
    for split_len in (0, 64):
        got = kernel.paged_attention_cpu(q, k, v, meta, 0.125, split_len=split_len, sliding_window=window)
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 48])
def test_cpu_kernel_lse_equals_the_reference(kernel, dtype, head_dim):
    """Each row's log-sum-exp (what attention sinks merge with): decode rows, split decodes, small and wide
    prefill tiles, and the portable loop (head_dim 48), with and without a window."""
    q, k, v, meta = make_batch([1, 1, 3, 60], [700, 90, 50, 300], 8, 2, head_dim, 16, dtype, seed=head_dim)
    scale = head_dim**-0.5
    for window in (None, 21):
        expected = torch.empty(q.shape[:2])
        paged_attention_reference(q.float(), k.float(), v.float(), meta, scale, sliding_window=window, lse=expected)
        scores = torch.einsum("hd,jhd->hj", q[0].float(), k[meta.block_tables[0, :44]].flatten(0, 1)[:700].float()
                              .repeat_interleave(4, dim=1)) * scale
        torch.testing.assert_close(expected[0], torch.logsumexp(scores[:, 700 - (window or 700):], dim=-1))
        for split_len in (0, 100):
            got = torch.full(q.shape[:2], float("nan"))
            kernel.paged_attention_cpu(q, k, v, meta, scale, split_len=split_len, sliding_window=window, lse=got)
            tol = 1e-4 if dtype == torch.float32 else 2e-2
            torch.testing.assert_close(got, expected, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 80, 128, 48])
def test_cpu_kernel_sliding_window_head_dims(kernel, dtype, head_dim):
    """The vectorized kernels' decode rows, small tiles and wide tiles with a window, and the portable loop (48)."""
    q, k, v, meta = make_batch([1, 1, 3, 37], [700, 90, 50, 300], 8, 2, head_dim, 16, dtype, seed=head_dim)
    expected = paged_attention_reference(q.float(), k.float(), v.float(), meta, head_dim**-0.5, sliding_window=21)
    k, v = dead_blocks_poisoned(k, v, meta, 21)
    for split_len in (0, 100):
        got = kernel.paged_attention_cpu(q, k, v, meta, head_dim**-0.5, split_len=split_len, sliding_window=21)
        tol = 2e-5 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(got.float(), expected, atol=tol, rtol=tol * 5)


@pytest.mark.parametrize("backend", [ReferenceBackend(), cpu.CpuBackend()], ids=["reference", "cpu"])
def test_attention_layer_passes_its_window(kernel, backend):
    q, k_cache, v_cache, meta = make_batch([1, 20], [50, 30], 4, 2, 16, 4, torch.float32, seed=3)
    layer = Attention(4, 2, 16, 0.25, sliding_window=5)
    layer.backend = backend
    empty = torch.empty(0, 2, 16)
    out = layer(q, empty, empty, KVCache(k_cache, v_cache), meta)
    torch.testing.assert_close(out, paged_attention_reference(q, k_cache, v_cache, meta, 0.25, sliding_window=5), atol=2e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="sliding_window must be an integer >= 1 or None, got 0"):
        Attention(4, 2, 16, 0.25, sliding_window=0)
