"""The Triton attention kernels give the reference backend's results, run on CPU by Triton's interpreter.

`@triton.jit` decides when it decorates a kernel whether to interpret it (triton 3.x reads
TRITON_INTERPRET through `triton.knobs` at that moment), so the variable is set before triton and
kvserve.attention.triton_attention are imported, and it stays set while this module's tests run
(the interpreter also consults it at launch). It is put back afterwards so that no other test
module sees it. No GPU is used or needed.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from kvserve.attention.kv_quant import quantize
from kvserve.attention.reference import paged_attention_reference, store_kv_index_copy
from kvserve.attention.selector import select_backend

_PREVIOUS_INTERPRET = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"
try:
    import triton  # noqa: F401

    from kvserve.attention import triton_attention as ta

    if not ta._INTERPRETED:  # imported earlier without the interpreter: decorate the kernels again
        ta = importlib.reload(ta)
except ImportError:
    ta = None
finally:
    if _PREVIOUS_INTERPRET is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = _PREVIOUS_INTERPRET

from test_attention import dead_blocks_poisoned  # noqa: E402
from test_attention import make_batch  # noqa: E402  (random scattered paged caches)

needs_triton = pytest.mark.skipif(ta is None, reason="triton is not installed")


@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def run(q, k, v, meta, scale, *scales, **kwargs):
    assert ta is not None and ta._INTERPRETED
    return ta.paged_attention_triton(q, k, v, meta, scale, *scales, **kwargs)


CASES = {
    # (query lens, seq lens): decodes first, then prefill chunks (some with a cached prefix)
    "one-token": ([1], [1]),
    "decodes-crossing-partitions": ([1, 1, 1], [5, 600, 1100]),  # 1, 2 and 3 partitions of 512
    "mixed": ([1, 1, 7, 40], [3, 20, 7, 100]),  # prefill from scratch and after a 60-token prefix
    "prefill-two-query-tiles": ([1, 70], [90, 200]),  # 70 queries (2 tiles of 64) after 130 cached keys
    "chunks-with-prefix": ([5, 17], [70, 17]),
}


@needs_triton
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("heads", [(4, 4), (8, 2), (6, 1)], ids=["mha", "gqa4", "mqa"])
def test_matches_reference_fp32(case, heads):
    query_lens, seq_lens = CASES[case]
    q, k, v, meta = make_batch(query_lens, seq_lens, heads[0], heads[1], 32, 16, torch.float32)
    expected = paged_attention_reference(q, k, v, meta, 32**-0.5)
    torch.testing.assert_close(run(q, k, v, meta, 32**-0.5), expected, atol=1e-5, rtol=1e-4)


@needs_triton
@pytest.mark.parametrize("block_size", [1, 32])
@pytest.mark.parametrize("case", ["mixed", "prefill-two-query-tiles"])
def test_block_sizes(block_size, case):
    """Block size 1 (every key row its own block) and 32 (blocks wider than a decode tile's share)."""
    query_lens, seq_lens = CASES[case]
    q, k, v, meta = make_batch(query_lens, seq_lens, 8, 2, 64, block_size, torch.float32, seed=block_size)
    expected = paged_attention_reference(q, k, v, meta, 0.125)
    torch.testing.assert_close(run(q, k, v, meta, 0.125), expected, atol=1e-5, rtol=1e-4)


@needs_triton
@pytest.mark.parametrize("partition_size", [16, 64])
def test_split_kv_partition_boundaries(partition_size):
    """Decodes just under, at and over partition edges; 1000 keys / 16 = 63 partitions, two reduce chunks."""
    seq_lens = [1, 15, 16, 17, 63, 64, 65, 200, 1000]
    q, k, v, meta = make_batch([1] * len(seq_lens), seq_lens, 4, 2, 32, 16, torch.float32, seed=3)
    expected = paged_attention_reference(q, k, v, meta, 0.2)
    got = run(q, k, v, meta, 0.2, partition_size=partition_size)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


@needs_triton
@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 1e-2), (torch.float16, 2e-3)], ids=["bf16", "fp16"])
def test_half_precision_head_dim_80(dtype, tol):
    """head_dim 80 is padded to a 128-wide tile and masked; decodes span 2 partitions."""
    q, k, v, meta = make_batch([1, 1, 9, 12], [600, 40, 30, 12], 8, 2, 80, 16, dtype)
    expected = paged_attention_reference(q.float(), k.float(), v.float(), meta, 80**-0.5)
    got = run(q, k, v, meta, 80**-0.5)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), expected, atol=tol, rtol=tol)


@needs_triton
def test_strided_query_view():
    """q as the model makes it: a view into a fused qkv projection (rows further apart than Hq*D)."""
    _, k, v, meta = make_batch([1, 6], [50, 20], 4, 2, 32, 16, torch.float32, seed=5)
    qkv = torch.randn(7, 4 + 2 * 2, 32, generator=torch.Generator().manual_seed(9))
    q = qkv[:, :4]
    assert not q.is_contiguous()
    expected = paged_attention_reference(q.contiguous(), k, v, meta, 0.3)
    got = run(q, k, v, meta, 0.3)
    assert got.is_contiguous()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


@needs_triton
def test_result_depends_on_the_block_table():
    """The kernels follow the block table: pointing a sequence at other blocks changes its output."""
    q, k, v, meta = make_batch([1, 8], [40, 24], 4, 4, 32, 16, torch.float32, seed=7)
    before = run(q, k, v, meta, 0.25)
    meta.block_tables[:, 0] = meta.block_tables[:, 0].flip(0)  # swap the two sequences' first blocks
    after = run(q, k, v, meta, 0.25)
    torch.testing.assert_close(after, paged_attention_reference(q, k, v, meta, 0.25), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(before, after)


@needs_triton
@pytest.mark.parametrize("window", [1, 5, 40, 100, 5000])
@pytest.mark.parametrize("case", ["decodes-crossing-partitions", "mixed", "prefill-two-query-tiles", "long-prefill"])
def test_sliding_window(window, case):
    """Each query sees its last `window` keys: decode partitions start at the window, prefill tiles mask the
    window's edge; no block before any window is read (they hold NaN here)."""
    query_lens, seq_lens = {**CASES, "long-prefill": ([1, 200], [30, 260])}[case]
    q, k, v, meta = make_batch(query_lens, seq_lens, 8, 2, 32, 4, torch.float32, seed=window)
    expected = paged_attention_reference(q, k, v, meta, 0.2, sliding_window=window)
    k, v = dead_blocks_poisoned(k, v, meta, window)
    for partition_size in (16, 512):
        got = run(q, k, v, meta, 0.2, partition_size=partition_size, sliding_window=window)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def quantized(k, v, kv_format):
    """The caches of `make_batch` stored as an int8 / fp8 cache: (k, v, k_scale, v_scale), scales [blocks, Hkv, bs]."""
    (kq, ks), (vq, vs) = quantize(k, kv_format), quantize(v, kv_format)
    return kq, vq, ks.transpose(1, 2).contiguous(), vs.transpose(1, 2).contiguous()


@needs_triton
@pytest.mark.parametrize("kv_format", ["int8", "fp8_e4m3"])
@pytest.mark.parametrize("case", ["decodes-crossing-partitions", "mixed", "prefill-two-query-tiles"])
def test_quantized_cache_matches_reference(kv_format, case):
    """int8 / fp8 caches read in place, each key's scale on its score and each value's on its weight: the same
    numbers as the reference backend, which dequantizes the gathered rows (fp8 through the bit trick)."""
    query_lens, seq_lens = CASES[case]
    q, k, v, meta = make_batch(query_lens, seq_lens, 8, 2, 32, 16, torch.float32, seed=11)
    caches = quantized(k, v, kv_format)
    expected = paged_attention_reference(q, *caches[:2], meta, 0.2, *caches[2:])
    for partition_size in (16, 512):
        got = run(q, *caches[:2], meta, 0.2, *caches[2:], partition_size=partition_size)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(expected, paged_attention_reference(q, k, v, meta, 0.2), atol=1e-4)  # quantization shows


@needs_triton
def test_fp8_bytes_widen_to_every_value():
    """All 254 finite fp8 e4m3 codes (subnormals and both signs) as a one-key cache with scale 1: the output is the
    value itself, so the kernels' widening from the bytes equals torch's conversion."""
    codes = torch.tensor([c for c in range(256) if c & 0x7F != 0x7F], dtype=torch.uint8)  # 0x7f / 0xff are NaN
    values = codes.view(torch.float8_e4m3fn)
    q, k, v, meta = make_batch([1], [1], 1, 1, len(values), 1, torch.float32)
    v8 = torch.zeros(v.shape, dtype=torch.float8_e4m3fn)
    v8[meta.block_tables[0, 0], 0, 0] = values
    ones = torch.ones(v.shape[0], 1, 1)
    got = run(q, k.to(torch.float8_e4m3fn), v8, meta, 1.0, ones, ones)
    torch.testing.assert_close(got[0, 0], values.float(), atol=0, rtol=0)


@needs_triton
@pytest.mark.parametrize("window", [None, 5, 40])
@pytest.mark.parametrize("kv_format", ["auto", "int8"])
def test_log_sum_exp_matches_reference(window, kv_format):
    """Each row's natural log-sum-exp (what attention sinks merge with): from the prefill kernel, the single-partition
    decode, and the reduce kernel when a decode spans several partitions."""
    q, k, v, meta = make_batch([1, 1, 1, 7, 70], [5, 100, 600, 7, 200], 8, 2, 32, 16, torch.float32, seed=13)
    scales = ()
    if kv_format != "auto":
        k, v, *scales = quantized(k, v, kv_format)
    expected = torch.empty(q.shape[:2])
    paged_attention_reference(q, k, v, meta, 0.2, *scales, sliding_window=window, lse=expected)
    for partition_size in (16, 512):
        lse = torch.full(q.shape[:2], float("nan"))
        run(q, k, v, meta, 0.2, *scales, partition_size=partition_size, sliding_window=window, lse=lse)
        torch.testing.assert_close(lse, expected, atol=1e-5, rtol=1e-5)


@needs_triton
def test_bad_arguments_are_clear_errors():
    q, k, v, meta = make_batch([1], [4], 4, 4, 32, 16, torch.float32)
    with pytest.raises(ValueError, match="partition_size"):
        run(q, k, v, meta, 0.25, partition_size=48)
    with pytest.raises(ValueError, match="kv heads"):
        run(q[:, :3], k, v, meta, 0.25)


# --- backend selection ---------------------------------------------------------------------------


@needs_triton
def test_selector_picks_triton_on_cuda():
    assert select_backend("auto", "cuda").attend is ta.paged_attention_triton
    assert select_backend("triton", "cuda").attend is ta.paged_attention_triton
    assert select_backend("reference", "cuda").attend is paged_attention_reference
    assert select_backend("triton", "cuda").store_kv is store_kv_index_copy


def test_selector_cpu_behaviour_is_unchanged():
    assert select_backend("auto", "cpu").attend.__name__ in ("paged_attention_cpu", "paged_attention_reference")
    assert select_backend("reference", "cpu").attend is paged_attention_reference
    with pytest.raises(ValueError, match="CUDA"):
        select_backend("triton", "cpu")


def test_selector_without_triton(monkeypatch):
    monkeypatch.setitem(sys.modules, "kvserve.attention.triton_attention", None)  # import now fails
    assert select_backend("auto", "cuda").attend is paged_attention_reference
    with pytest.raises(ValueError, match="triton"):
        select_backend("triton", "cuda")


def test_config_and_cli_accept_triton():
    from kvserve.config import EngineConfig
    from kvserve.entrypoints.cli import build_parser

    assert EngineConfig(attention_backend="triton", device="cpu").attention_backend == "triton"
    with pytest.raises(ValueError, match="attention_backend"):
        EngineConfig(attention_backend="flash", device="cpu")
    args = build_parser().parse_args(["generate", "hi", "--attention-backend", "triton"])
    assert args.attention_backend == "triton"


# --- the kernels compile for real GPUs -----------------------------------------------------------

_COMPILE_SCRIPT = textwrap.dedent(
    """
    import torch, triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    import kvserve.attention.triton_attention as ta

    def signature(fn, dtype, cache, constexprs):
        sig = {}
        for name in fn.arg_names:
            if name in constexprs:
                sig[name] = "constexpr"
            elif name in ("block_tables_ptr", "seq_lens_ptr", "query_start_loc_ptr"):
                sig[name] = "*i64"
            elif name in ("part_out_ptr", "part_lse_ptr", "k_scale_ptr", "v_scale_ptr", "lse_ptr"):
                sig[name] = "*fp32"
            elif name in ("k_cache_ptr", "v_cache_ptr"):
                sig[name] = cache
            elif name.endswith("_ptr"):
                sig[name] = dtype
            else:
                sig[name] = "fp32" if name == "qk_scale" else "i32"
        return sig

    assert not ta._INTERPRETED
    variants = ((torch.bfloat16, "*bf16", "*bf16", 0, 128, 4), (torch.float16, "*fp16", "*fp16", 0, 64, 1),
                (torch.float32, "*fp32", "*fp32", 0, 80, 8), (torch.bfloat16, "*bf16", "*i8", 1, 128, 4),
                (torch.float16, "*fp16", "*u8", 2, 64, 8))
    for arch in (80, 90):
        for dtype, name, cache, kv_format, head_dim, group in variants:
            fmt = dict(KV_FORMAT=kv_format, WRITE_LSE=kv_format > 0)  # the quantized variants also write lse
            configs = [
                (ta._prefill_kernel, {**ta.prefill_config(dtype, head_dim, 300), **fmt}),
                (ta._decode_partition_kernel, {**ta.decode_config(dtype, head_dim, group, 4, ta.PARTITION_SIZE), **fmt}),
                (ta._decode_reduce_kernel, dict(PARTITION=ta.PARTITION_SIZE, BLOCK_P=4, BLOCK_D=triton.next_power_of_2(head_dim),
                                                WRITE_LSE=kv_format > 0, num_warps=4)),
            ]
            for fn, config in configs:
                options = {key: config.pop(key) for key in ("num_warps", "num_stages") if key in config}
                kernel = triton.compile(ASTSource(fn, signature(fn, name, cache, config), constexprs=config),
                                        target=GPUTarget("cuda", arch, 32), options=options)
                assert kernel.asm["cubin"], (arch, fn.__name__)
    print("compiled")
    """
)


@needs_triton
@pytest.mark.slow
def test_kernels_compile_for_sm80_and_sm90(tmp_path):
    """Lower every kernel through Triton's NVIDIA backend to a cubin (LLVM and the bundled ptxas; no GPU).

    The interpreter is lenient (it runs the Python); this catches what only the compiler rejects.
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    result = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-3000:]
