"""An int8 / fp8 e4m3 KV cache (--kv-cache-dtype): `store_kv` writes exactly torch's quantization, and the
CPU kernel over a quantized cache equals the reference backend on the dequantized rows (tight), and
full-precision attention within what the format loses (loose)."""

from __future__ import annotations

import pytest
import torch

from kvserve.attention import cpu, kv_quant
from kvserve.attention.kv_cache import KVCache
from kvserve.attention.reference import ReferenceBackend, paged_attention_reference, store_kv_index_copy
from kvserve.layers.attention import Attention
from test_attention import CASES, make_batch

FORMATS = ["int8", "fp8_e4m3"]
# ||out(quantized cache) - out(fp32 cache)|| / ||out(fp32 cache)|| on these random caches (N(0, 1) K/V) was
# 0.64-0.72% for int8 (half a step of amax/127 per value) and 2.7-3.0% for fp8 e4m3 (3 mantissa bits: a
# relative step of 1/16 at worst); the bounds leave room for other shapes and seeds.
FULL_PRECISION_TOLERANCE = {"int8": 1e-2, "fp8_e4m3": 6e-2}


@pytest.fixture(scope="module")
def kernel():
    if cpu.load() is None:
        pytest.skip("the CPU attention kernel could not be built here (no g++?)")
    return cpu


def quantized(cache: torch.Tensor, kv_format: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A [blocks, block_size, Hkv, D] cache as values of `kv_format` and scales [blocks, Hkv, block_size]."""
    values, scales = kv_quant.quantize(cache, kv_format)
    return values, scales.transpose(1, 2).contiguous()


def quantized_batch(query_lens, seq_lens, heads, kv_heads, head_dim, block_size, kv_format, seed=0):
    """q (fp32), the fp32 cache, the same cache quantized, and the metadata (test_attention.make_batch)."""
    q, k, v, meta = make_batch(query_lens, seq_lens, heads, kv_heads, head_dim, block_size, torch.float32, seed)
    (kq, ks), (vq, vs) = quantized(k, kv_format), quantized(v, kv_format)
    return q, (k, v), KVCache(kq, vq, ks, vs), meta


def reference_on(q: torch.Tensor, cache: KVCache, meta, scale: float) -> torch.Tensor:
    return paged_attention_reference(q, cache.key, cache.value, meta, scale, *cache.scales)


def same_bytes(a: KVCache, b: KVCache) -> bool:
    """Whether two caches hold the same bytes (fp8 has no torch.equal)."""
    return all(torch.equal(x.view(torch.uint8), y.view(torch.uint8)) for x, y in zip(a.tensors(), b.tensors()))


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


@pytest.mark.parametrize("kv_format", FORMATS)
@pytest.mark.parametrize("query_lens, seq_lens", CASES)
@pytest.mark.parametrize("heads", [(4, 4), (9, 3)], ids=["mha", "gqa"])
@pytest.mark.parametrize("block_size", [1, 16])
def test_kernel_matches_the_reference_on_the_dequantized_cache(kernel, kv_format, query_lens, seq_lens, heads, block_size):
    """Decodes, prefill chunks over cached prefixes, GQA, many blocks, and long decodes split at 64 and 512 keys."""
    q, full, cache, meta = quantized_batch(query_lens, seq_lens, *heads, 64, block_size, kv_format)
    expected = reference_on(q, cache, meta, 0.125)
    for split_len in (0, 64, 512):
        got = kernel.paged_attention_cpu(q, cache.key, cache.value, meta, 0.125, *cache.scales, split_len=split_len)
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    exact = paged_attention_reference(q, *full, meta, 0.125)
    assert relative_error(expected, exact) < FULL_PRECISION_TOLERANCE[kv_format]


@pytest.mark.parametrize("kv_format", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 80, 96, 128, 256, 48])
def test_kernel_head_dims_and_query_dtypes(kernel, kv_format, dtype, head_dim):
    """Every head dim the vector kernels specialise (and 48, which they do not), q and out in each model dtype."""
    q, full, cache, meta = quantized_batch([1, 1, 37], [700, 90, 300], 8, 2, head_dim, 16, kv_format, seed=head_dim)
    q = q.to(dtype)
    expected = reference_on(q.float(), cache, meta, head_dim**-0.5)
    for split_len in (0, 100):
        got = kernel.paged_attention_cpu(q, cache.key, cache.value, meta, head_dim**-0.5, *cache.scales, split_len=split_len)
        assert got.dtype == dtype
        tol = 2e-5 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(got.float(), expected, atol=tol, rtol=tol * 5)
    exact = paged_attention_reference(q.float(), *full, meta, head_dim**-0.5)
    assert relative_error(expected, exact) < FULL_PRECISION_TOLERANCE[kv_format]


@pytest.mark.parametrize("kv_format", FORMATS)
@pytest.mark.parametrize("head_dim", [64, 48])
def test_kernel_sliding_window_on_a_quantized_cache(kernel, kv_format, head_dim):
    """A window over int8 / fp8 rows: decodes (split and not), small and wide prefill tiles, the portable loop (48)."""
    q, _, cache, meta = quantized_batch([1, 1, 3, 37], [700, 90, 50, 300], 8, 2, head_dim, 16, kv_format, seed=5)
    expected = paged_attention_reference(q, cache.key, cache.value, meta, 0.125, *cache.scales, sliding_window=21)
    for split_len in (0, 100):
        got = kernel.paged_attention_cpu(q, cache.key, cache.value, meta, 0.125, *cache.scales, split_len=split_len,
                                         sliding_window=21)
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("kv_format", FORMATS)
def test_long_prefill_in_one_chunk(kernel, kv_format):
    """A 2k-token prompt in one chunk: the prefill tiles, whose K/V chunks are dequantized as they are widened."""
    q, full, cache, meta = quantized_batch([2048], [2048], 4, 2, 64, 16, kv_format)
    got = kernel.paged_attention_cpu(q, cache.key, cache.value, meta, 0.125, *cache.scales)
    torch.testing.assert_close(got, reference_on(q, cache, meta, 0.125), atol=2e-5, rtol=1e-4)
    assert relative_error(got, paged_attention_reference(q, *full, meta, 0.125)) < FULL_PRECISION_TOLERANCE[kv_format]


def test_every_fp8_value_is_read_as_torch_reads_it(kernel):
    """One decode over one key: the output is the value row itself, so every e4m3 byte (NaNs excepted) read by
    the kernel (its fp16 trick where vectorized, a table elsewhere) must equal torch's float8_e4m3fn -> fp32."""
    codes = torch.arange(256, dtype=torch.int32)
    codes[(codes & 0x7F) == 0x7F] = 0  # the two NaNs
    values = codes.to(torch.uint8).view(torch.float8_e4m3fn).view(1, 1, 4, 64)
    scales = torch.ones(1, 4, 1)
    cache = KVCache(torch.zeros_like(values), values, scales, scales)
    _, _, _, meta = make_batch([1], [1], 4, 4, 64, 1, torch.float32)
    meta.block_tables = torch.zeros(1, 1, dtype=torch.int64)
    q = torch.randn(1, 4, 64)
    got = kernel.paged_attention_cpu(q, cache.key, cache.value, meta, 0.125, *cache.scales)
    assert torch.equal(got, values.float().view(1, 4, 64))


@pytest.mark.parametrize("kv_format", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", [3, 300])  # 300: the parallel store
def test_store_kv_writes_torch_quantization(kernel, kv_format, dtype, tokens):
    """K/V rows that are strided views of a fused QKV output land quantized in their slots with their scales,
    byte for byte as kv_quant.quantize (and the reference backend's store) writes them; nothing else moves."""
    gen = torch.Generator().manual_seed(tokens)
    heads, kv_heads, head_dim, blocks, block_size = 6, 2, 64, 40, 16
    qkv = (torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=gen) * 3).to(dtype)
    qkv[0, heads * head_dim:] = 0  # an all-zero row: scale 0, values 0
    _, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    k, v = k.view(tokens, kv_heads, head_dim), v.view(tokens, kv_heads, head_dim)
    slots = torch.randperm(blocks * block_size, generator=gen)[:tokens]

    def empty_cache() -> KVCache:
        shape, scales = (blocks, block_size, kv_heads, head_dim), (blocks, kv_heads, block_size)
        values = torch.full(shape, 3, dtype=torch.uint8).view(kv_quant.STORAGE_DTYPES[kv_format])
        return KVCache(values, values.clone(), torch.full(scales, -1.0), torch.full(scales, -1.0))

    got, by_reference, want = empty_cache(), empty_cache(), empty_cache()
    assert kernel.can_store_kv(k, got.key)
    kernel.store_kv(k, v, got.key, got.value, slots, *got.scales)
    store_kv_index_copy(k, v, by_reference.key, by_reference.value, slots, *by_reference.scales)
    for x, values, scales in ((k, want.key, want.key_scale), (v, want.value, want.value_scale)):
        row_values, row_scales = kv_quant.quantize(x, kv_format)
        values.view(torch.uint8).view(-1, kv_heads, head_dim)[slots] = row_values.view(torch.uint8)
        scales[slots // block_size, :, slots % block_size] = row_scales
    assert want.key_scale[slots[0] // block_size, :, slots[0] % block_size].eq(0).all()
    assert same_bytes(got, want) and same_bytes(by_reference, want)


@pytest.mark.parametrize("kv_format", FORMATS)
def test_quantization_rounds_as_torch_does(kernel, kv_format):
    """Rows whose amax is exactly 127 (int8) or 448 (fp8) have scale 1, so the stored bytes are the values'
    own rounding: ties to even, fp8 subnormals, the carry into the next binade, both signs, compared with
    torch's round() / float8_e4m3fn conversion."""
    qmax = kv_quant.QMAX[kv_format]
    if kv_format == "int8":
        special = torch.arange(-127, 128, dtype=torch.float32) + 0.5  # every tie
    else:
        finite = torch.arange(256, dtype=torch.int32)
        finite = finite[(finite & 0x7F) != 0x7F].to(torch.uint8).view(torch.float8_e4m3fn).float().unique()
        middles = (finite[1:] + finite[:-1]) / 2  # ties between neighbours (to even), and one ulp either side
        special = torch.cat([finite, middles, middles.nextafter(torch.tensor(0.0)), middles.nextafter(torch.tensor(1e9))])
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(4096, generator=gen) * torch.exp2(torch.randint(-14, 8, (4096,), generator=gen).float())
    x = torch.cat([special, noise]).clamp(-qmax, qmax)
    x = torch.cat([x, torch.zeros(-x.numel() % 63)]).view(-1, 1, 63)
    rows = torch.cat([x, torch.full((x.shape[0], 1, 1), qmax)], dim=-1)  # amax = qmax: scale exactly 1
    n = rows.shape[0]
    values = torch.zeros(n, 1, 1, 64, dtype=kv_quant.STORAGE_DTYPES[kv_format])
    cache = KVCache(values, values.clone(), torch.zeros(n, 1, 1), torch.zeros(n, 1, 1))
    kernel.store_kv(rows, rows, cache.key, cache.value, torch.arange(n), *cache.scales)
    assert cache.key_scale.eq(1).all()
    expected = rows.round().to(torch.int8) if kv_format == "int8" else rows.to(torch.float8_e4m3fn)
    assert torch.equal(cache.key.view(torch.uint8).view(n, 1, 64), expected.view(torch.uint8))


@pytest.mark.parametrize("kv_format", FORMATS)
@pytest.mark.parametrize("backend", [ReferenceBackend(), cpu.CpuBackend()], ids=["reference", "cpu"])
def test_attention_layer_stores_quantized_then_attends(kernel, kv_format, backend):
    """The layer hands its backend the cache's scales: this step's K/V are quantized into their slots, and
    the output is attention over the dequantized cache."""
    heads, kv_heads, head_dim, block_size = 6, 2, 64, 4
    q, _, cache, meta = quantized_batch([1, 3], [6, 9], heads, kv_heads, head_dim, block_size, kv_format, seed=2)
    meta.slot_mapping = torch.tensor([int(meta.block_tables[0, 1]) * block_size + 1]
                                     + [int(meta.block_tables[1, p // block_size]) * block_size + p % block_size for p in (6, 7, 8)])
    gen = torch.Generator().manual_seed(4)
    k, v = torch.randn(4, kv_heads, head_dim, generator=gen), torch.randn(4, kv_heads, head_dim, generator=gen)
    want = KVCache(*(t.clone() for t in cache))
    store_kv_index_copy(k, v, want.key, want.value, meta.slot_mapping, *want.scales)
    layer = Attention(heads, kv_heads, head_dim, head_dim**-0.5)
    layer.backend = backend
    out = layer(q, k, v, cache, meta)
    assert same_bytes(cache, want)
    torch.testing.assert_close(out, reference_on(q, want, meta, head_dim**-0.5), atol=2e-5, rtol=1e-4)
