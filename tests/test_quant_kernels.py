"""The quantized-GGUF kernels (csrc/quant_linear.cpp via layers/cpu_quant.py) against gguf.quants.

Weights are GGML blocks: random float weights quantized by `gguf.quants.quantize` (Q4_0, Q4_1,
Q5_0, Q5_1, Q8_0; gguf has no K-quant quantizer) and raw random blocks with random finite fp16
scales (every format: all nibble/byte values and fifth bits, Q8_0's -128, scales of both signs,
large Q4_1/Q5_1 offsets).

Dequantization must equal `gguf.quants.dequantize` bit for bit (bf16: those values rounded).

Products: the kernel quantizes each activation row into int8 blocks of 32, x ~ d qx with
d = max|x_block| / 127 and |x - d qx| <= d / 2, then multiplies integers exactly. So against
x @ dequantize(w).T in float64:
    |y - y_ref| <= sum_k |w_nk| d_mk / 2                       (the activation rounding)
                 + 1e-4 sum_k |x_mk| max|w_n,block(k)|         (fp32 scaling and accumulation)
                 + 2^-8 (|y_ref| + the above)                  (bf16 output only)
The fp32 term allows for the per-block scaled sums (~48 blocks + a 16-lane reduction at K = 1536,
each ~6e-8 relative) and for offsets t that partly cancel s q (|s q| + |t| <= ~4 max|w| in a
block). Activations that are exactly int8 times their block scale quantize without error, and
then only the fp32 term remains (at 2e-5), which checks the integer arithmetic on its own.
"""

from __future__ import annotations

from functools import cache

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

from kvserve.layers import cpu_quant

pytestmark = pytest.mark.skipif(cpu_quant.load() is None, reason="the quantized-linear C++ kernel could not be built here")

Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K = 2, 3, 6, 7, 8, 12, 13, 14
FORMATS = [Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K]
GGUF_QUANTIZABLE = [Q4_0, Q4_1, Q5_0, Q5_1, Q8_0]
BLOCK_32 = [f for f in FORMATS if cpu_quant.SUPPORTED_FORMATS[f][0] == 32]  # one block per 32 weights
N = 83  # output rows: not a multiple of the kernels' 4- and 16-row groups


def model_k(fmt: int) -> list[int]:
    """SmolLM2-135M's K (576, 1536); K-quants need multiples of 256, so 512 stands in for 576."""
    return [576, 1536] if cpu_quant.SUPPORTED_FORMATS[fmt][0] == 32 else [512, 1536]


# every byte random, then each block's fp16 fields random and finite: (byte offset, low, high)
FP16_FIELDS = {
    Q4_0: [(0, -0.05, 0.05)],
    Q4_1: [(0, -0.05, 0.05), (2, -0.5, 0.5)],
    Q5_0: [(0, -0.03, 0.03)],
    Q5_1: [(0, -0.03, 0.03), (2, -0.5, 0.5)],
    Q8_0: [(0, -0.01, 0.01)],
    Q4_K: [(0, -0.01, 0.01), (2, -0.01, 0.01)],
    Q5_K: [(0, -0.01, 0.01), (2, -0.01, 0.01)],
    Q6_K: [(208, -0.005, 0.005)],
}


@cache
def raw_blocks(fmt: int, n: int, k: int) -> np.ndarray:
    rng = np.random.default_rng(fmt * 100_003 + n * 101 + k)
    block_weights, block_bytes = cpu_quant.SUPPORTED_FORMATS[fmt]
    blocks = rng.integers(0, 256, size=(n, k // block_weights, block_bytes), dtype=np.uint8)
    for offset, low, high in FP16_FIELDS[fmt]:
        values = rng.uniform(low, high, size=(n, k // block_weights, 1)).astype(np.float16)
        blocks[:, :, offset:offset + 2] = values.view(np.uint8)
    return blocks.reshape(n, -1)


@cache
def gguf_quantized(fmt: int, n: int, k: int) -> np.ndarray:
    rng = np.random.default_rng(fmt * 7 + n * 13 + k)
    return quants.quantize(rng.standard_normal((n, k)).astype(np.float32) * 0.05, GGMLQuantizationType(fmt))


def weights(kind: str, fmt: int, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(blocks as a uint8 tensor, gguf's dequantized fp32 weights)."""
    blocks = raw_blocks(fmt, n, k) if kind == "raw" else gguf_quantized(fmt, n, k)
    return torch.from_numpy(blocks.copy()), torch.from_numpy(quants.dequantize(blocks, GGMLQuantizationType(fmt)))


def tolerance(x: torch.Tensor, w: torch.Tensor, reference: torch.Tensor, dtype: torch.dtype, exact_x: bool = False) -> torch.Tensor:
    """The module docstring's bound for y[M, N] = x[M, K] @ w[N, K].T (+ bias), in float64."""
    m, k = x.shape
    x, w = x.double(), w.double()
    block_max_w = w.abs().reshape(w.shape[0], k // 32, 32).amax(-1).repeat_interleave(32, dim=1)
    bound = (2e-5 if exact_x else 1e-4) * (x.abs() @ block_max_w.T)
    if not exact_x:
        d = x.abs().reshape(m, k // 32, 32).amax(-1) / 127
        bound = bound + (d / 2).repeat_interleave(32, dim=1) @ w.abs().T * (1 + 1e-5)
    if dtype == torch.bfloat16:
        bound = bound + 2.0**-8 * (reference.abs() + bound)
    return bound


def check_product(x: torch.Tensor, blocks: torch.Tensor, w: torch.Tensor, fmt: int, bias: torch.Tensor | None,
                  exact_x: bool = False) -> None:
    n, k = w.shape
    y = cpu_quant.quant_linear(x, blocks, fmt, bias, n, k)
    assert y.dtype == x.dtype and y.shape == (x.shape[0], n)
    reference = x.double() @ w.double().T + (0 if bias is None else bias.double())
    error = (y.double() - reference).abs()
    bound = tolerance(x, w, reference, x.dtype, exact_x)
    worst = (error / bound).max().item() if error.numel() else 0.0
    assert worst <= 1, f"error {worst:.3g}x the bound (max error {error.max().item():.3g})"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("m", [1, *range(2, 12), 70])
@pytest.mark.parametrize("k_index", [0, 1], ids=["k_small", "k_1536"])
@pytest.mark.parametrize("fmt", FORMATS, ids=[cpu_quant.FORMAT_NAMES[f] for f in FORMATS])
def test_product_within_the_int8_activation_bound(fmt: int, k_index: int, m: int, bias: bool, dtype: torch.dtype) -> None:
    k = model_k(fmt)[k_index]
    kind = "gguf" if fmt in GGUF_QUANTIZABLE and m % 2 else "raw"
    blocks, w = weights(kind, fmt, N, k)
    gen = torch.Generator().manual_seed(fmt * 1000 + m * 10 + k)
    x = torch.randn(m, k, generator=gen).to(dtype)
    b = torch.randn(N, generator=gen).to(dtype) if bias else None
    check_product(x, blocks, w, fmt, b)


def exact_activations(m: int, k: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Rows that int8 blocks hold exactly: q * 2^e per block of 32 with |q| <= 127 and some |q| = 127."""
    q = torch.randint(-127, 128, (m, k // 32, 32), generator=gen).float()
    q[:, :, 5] = 127 * torch.where(torch.rand(m, k // 32, generator=gen) < 0.5, -1.0, 1.0)
    scale = torch.exp2(torch.randint(-9, 2, (m, k // 32, 1), generator=gen).float())
    return (q * scale).reshape(m, k).to(dtype)  # exact in bf16 too: 8 significant bits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 6, 7, 9, 16, 33])
@pytest.mark.parametrize("fmt", FORMATS, ids=[cpu_quant.FORMAT_NAMES[f] for f in FORMATS])
def test_product_is_exact_up_to_fp32_rounding_when_activations_are_int8(fmt: int, m: int, dtype: torch.dtype) -> None:
    """With no activation rounding, what is left is the integer dot products (exact) and their fp32
    scaling: any lane, nibble, offset or sign mistake would show far above 2e-5."""
    for k in model_k(fmt):
        blocks, w = weights("raw", fmt, N, k)
        gen = torch.Generator().manual_seed(fmt + 31 * m + k)
        x = exact_activations(m, k, dtype, gen)
        check_product(x, blocks, w, fmt, torch.randn(N, generator=gen).to(dtype), exact_x=True)


@pytest.mark.parametrize("fmt", BLOCK_32, ids=[cpu_quant.FORMAT_NAMES[f] for f in BLOCK_32])
@pytest.mark.parametrize("k", [32, 96, 160])
@pytest.mark.parametrize("m", [1, 3, 8])
def test_odd_block_counts_and_tiny_shapes(fmt: int, k: int, m: int) -> None:
    """K / 32 odd (the last block of a row has no partner in the 2-block steps) and N of 1-17 rows."""
    for n in (1, 5, 17):
        blocks, w = weights("raw", fmt, n, k)
        gen = torch.Generator().manual_seed(fmt + k + m + n)
        check_product(exact_activations(m, k, torch.float32, gen), blocks, w, fmt, None, exact_x=True)
        check_product(torch.randn(m, k, generator=gen), blocks, w, fmt, torch.randn(n, generator=gen))


@pytest.mark.parametrize("fmt", [Q4_1, Q5_0, Q5_1, Q8_0, Q6_K], ids=["Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q6_K"])
@pytest.mark.parametrize("m", [1, 5, 40])
def test_many_output_rows_split_into_chunks(fmt: int, m: int) -> None:
    """Enough rows for dozens of dynamically scheduled chunks (and the threads to share them)."""
    k = 768
    blocks, w = weights("raw", fmt, 1000, k)
    gen = torch.Generator().manual_seed(m)
    check_product(torch.randn(m, k, generator=gen).bfloat16(), blocks, w, fmt, None)


def test_zero_rows_and_strided_activations() -> None:
    blocks, w = weights("raw", Q4_1, 20, 576)
    assert cpu_quant.quant_linear(torch.empty(0, 576), blocks, Q4_1, None, 20, 576).shape == (0, 20)
    x = torch.randn(576, 3).t()  # [3, 576], not contiguous
    check_product(x, blocks, w, Q4_1, None)


@pytest.mark.parametrize("fmt, kind", [(f, "raw") for f in FORMATS] + [(f, "gguf") for f in GGUF_QUANTIZABLE],
                         ids=[f"{cpu_quant.FORMAT_NAMES[f]}-raw" for f in FORMATS] + [f"{cpu_quant.FORMAT_NAMES[f]}-gguf" for f in GGUF_QUANTIZABLE])
def test_dequantize_equals_gguf_bit_for_bit(fmt: int, kind: str) -> None:
    ks = [*model_k(fmt), 256] + ([32, 96] if fmt in GGUF_QUANTIZABLE else [])
    for k in ks:
        blocks, w = weights(kind, fmt, N, k)  # 83 x 1536 is past the size that dequantizes on all threads
        got = cpu_quant.dequantize(blocks, fmt, k)
        assert got.dtype == torch.float32 and torch.equal(got, w), f"K = {k}"
        assert torch.equal(cpu_quant.dequantize(blocks, fmt, k, dtype=torch.bfloat16), w.bfloat16()), f"K = {k}"
        assert torch.equal(cpu_quant.dequantize(blocks, fmt, k, rows=slice(7, 40)), w[7:40])
        assert torch.equal(cpu_quant.dequantize(blocks, fmt, k, rows=slice(-3, None), dtype=torch.bfloat16), w[-3:].bfloat16())
        assert cpu_quant.dequantize(blocks, fmt, k, rows=slice(9, 9)).shape == (0, k)


@pytest.mark.parametrize("fmt", FORMATS, ids=[cpu_quant.FORMAT_NAMES[f] for f in FORMATS])
def test_dequantize_rows_gathers_the_right_rows(fmt: int) -> None:
    k = model_k(fmt)[0]
    blocks, w = weights("raw", fmt, N, k)
    ids = torch.tensor([[5, 0, 82], [5, 41, 17]])  # repeats, both ends, a 2-D batch of ids
    got = cpu_quant.dequantize_rows(blocks, fmt, k, ids)
    assert got.shape == (2, 3, k) and torch.equal(got, w[ids])
    assert torch.equal(cpu_quant.dequantize_rows(blocks, fmt, k, ids.int(), dtype=torch.bfloat16), w[ids].bfloat16())
    assert cpu_quant.dequantize_rows(blocks, fmt, k, torch.tensor([], dtype=torch.int64)).shape == (0, k)
    with pytest.raises(IndexError):
        cpu_quant.dequantize_rows(blocks, fmt, k, torch.tensor([N]))


@pytest.mark.parametrize("fmt, name", [(9, "Q8_1"), (10, "Q2_K"), (1, "F16"), (99, "GGML type 99")])
def test_unsupported_formats_are_refused_by_name(fmt: int, name: str) -> None:
    blocks = torch.zeros(4, 64, dtype=torch.uint8)
    with pytest.raises(ValueError, match=f"{name} .*not supported"):
        cpu_quant.quant_linear(torch.randn(1, 256), blocks, fmt, None, 4, 256)
    with pytest.raises(ValueError, match=f"{name} .*not supported"):
        cpu_quant.dequantize(blocks, fmt, 256)
    with pytest.raises(ValueError, match=f"{name} .*not supported"):
        cpu_quant.dequantize_rows(blocks, fmt, 256, torch.tensor([0]))


def test_shapes_and_dtypes_are_checked() -> None:
    blocks, _ = weights("raw", Q4_1, 8, 576)
    with pytest.raises(ValueError, match="multiple of Q4_1's block"):
        cpu_quant.dequantize(blocks, Q4_1, 570)
    with pytest.raises(ValueError, match=r"\[N, 360\]"):
        cpu_quant.dequantize(blocks[:, :100], Q4_1, 576)
    with pytest.raises(ValueError, match="not N = 9"):
        cpu_quant.quant_linear(torch.randn(1, 576), blocks, Q4_1, None, 9, 576)
    with pytest.raises(ValueError, match="x must be"):
        cpu_quant.quant_linear(torch.randn(1, 512), blocks, Q4_1, None, 8, 576)
    with pytest.raises(ValueError, match="dtype"):
        cpu_quant.quant_linear(torch.randn(1, 576).half(), blocks, Q4_1, None, 8, 576)
    with pytest.raises(ValueError, match="bias"):
        cpu_quant.quant_linear(torch.randn(1, 576), blocks, Q4_1, torch.randn(8).bfloat16(), 8, 576)
