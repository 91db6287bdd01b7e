"""The C++ linear kernel (csrc/linear.cpp) against F.linear, and how layers pick it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kvserve.config import EngineConfig
from kvserve.layers import cpu_linear
from kvserve.layers.linear import Linear, MergedLinear
from kvserve.models.kernel_plan import install_kernels

pytestmark = pytest.mark.skipif(cpu_linear.load() is None, reason="the C++ linear kernel could not be built here")

DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16)]


@pytest.mark.parametrize("x_dtype,w_dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 2, 3, 5, 16, 33])
@pytest.mark.parametrize("n,k", [(960, 576), (7, 13), (130, 40), (5, 1)])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_f_linear(x_dtype: torch.dtype, w_dtype: torch.dtype, m: int, n: int, k: int, bias: bool) -> None:
    gen = torch.Generator().manual_seed(m * 1000 + n + k)
    w = torch.randn(n, k, generator=gen).to(w_dtype)
    x = torch.randn(m, k, generator=gen).to(x_dtype)
    b = torch.randn(n, generator=gen).to(w_dtype) if bias else None
    kernel = cpu_linear.cpu_linear_kernel(x_dtype, w)
    assert kernel is not None
    got = kernel(x, w, b)
    expected = F.linear(x.double(), w.double(), None if b is None else b.double())
    assert got.dtype == x_dtype and got.shape == (m, n)
    # fp32 accumulation in a different order; bf16 outputs are rounded once more
    tol = 2e-2 if x_dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(got.double(), expected, atol=tol * k**0.5, rtol=tol)


@pytest.mark.parametrize("m", [8, 13, 24, 64, 200])
@pytest.mark.parametrize("n,k", [(960, 576), (576, 2100), (70, 1601), (70, 1536), (130, 40), (7, 13), (70, 77)])
def test_many_rows_match_f_linear(m: int, n: int, k: int) -> None:
    """Row counts on both sides of the bf16 GEMM's threshold (24) where the CPU has AVX-512 BF16 (panels of 64 weight
    rows split among threads or x rows split, k whole up to 1,536 and in chunks of at most 768
    beyond, ragged n, odd k (whole, or in the last chunk: 1,601 = 534 + 534 + 533) and rows that start off a
    4-byte boundary)."""
    gen = torch.Generator().manual_seed(m * 1000 + n + k)
    w = torch.randn(n, k, generator=gen).bfloat16()
    x = torch.randn(m, k, generator=gen).bfloat16()
    b = torch.randn(n, generator=gen).bfloat16()
    kernel = cpu_linear.cpu_linear_kernel(torch.bfloat16, w)
    got = kernel(x, w, b)
    expected = F.linear(x.double(), w.double(), b.double())
    torch.testing.assert_close(got.double(), expected, atol=2e-2 * k**0.5, rtol=2e-2)


@pytest.mark.parametrize("x_dtype,w_dtype", DTYPES)
@pytest.mark.parametrize("n,k", [(960, 576), (576, 1536), (70, 77), (5, 1)])
def test_few_rows_equal_one_row_products_bit_for_bit(x_dtype: torch.dtype, w_dtype: torch.dtype, n: int, k: int) -> None:
    """Products of a few rows accumulate each row exactly as the one-row product does, so a sequence's outputs
    do not depend on how many rows share its step (speculative verification, small batches): up to 6 rows on
    every path (linear.cpp's FEW_ROWS), up to 23 for bf16 on the AVX-512 BF16 path (below its GEMM_MIN_ROWS)."""
    from kvserve import native

    bf16_path = (x_dtype, w_dtype) == (torch.bfloat16, torch.bfloat16) and native.compiled_isa(cpu_linear.load()) == "avx512_bf16"
    most = 23 if bf16_path else 6
    gen = torch.Generator().manual_seed(n + k)
    w = torch.randn(n, k, generator=gen).to(w_dtype)
    b = torch.randn(n, generator=gen).to(w_dtype)
    x = torch.randn(most, k, generator=gen).to(x_dtype)
    kernel = cpu_linear.cpu_linear_kernel(x_dtype, w)
    alone = torch.cat([kernel(x[i:i + 1], w, b) for i in range(most)])
    for m in sorted({2, 3, 4, 5, most} | ({8, 9, 16} if bf16_path else set())):
        assert torch.equal(kernel(x[:m], w, b), alone[:m]), m


def test_non_contiguous_input_is_made_contiguous() -> None:
    w = torch.randn(64, 32)
    x = torch.randn(32, 6).t()  # [6, 32], strided
    kernel = cpu_linear.cpu_linear_kernel(torch.float32, w)
    torch.testing.assert_close(kernel(x, w, None), F.linear(x, w), atol=1e-4, rtol=1e-4)


def test_unsupported_weights_get_no_kernel() -> None:
    assert cpu_linear.cpu_linear_kernel(torch.float16, torch.randn(4, 4).half()) is None
    assert cpu_linear.cpu_linear_kernel(torch.float32, torch.randn(4, 8).t()) is None  # not contiguous


def test_layers_route_few_rows_to_the_kernel_and_many_to_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    model = torch.nn.Sequential(Linear(16, 8, bias=True), MergedLinear(8, [4, 4]))
    for p in model.parameters():
        p.data.normal_()
    assert install_kernels(model, torch.float32, "cpu").linear_kernels == 2
    layer = model[0]
    calls: list[int] = []
    real = layer.kernel.__call__

    class Spy(cpu_linear.CpuLinearKernel):
        def __call__(self, x, weight, bias):  # type: ignore[no-untyped-def]
            calls.append(x.shape[0])
            return real(x, weight, bias)

    layer.kernel = Spy(layer.kernel.fn, max_rows=4)
    few, many = torch.randn(4, 16), torch.randn(5, 16)
    torch.testing.assert_close(layer(few), F.linear(few, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer(many), F.linear(many, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)
    assert calls == [4]  # 5 rows went to torch


def test_backend_names() -> None:
    model = torch.nn.Sequential(Linear(16, 8))
    assert install_kernels(model, torch.float32, "cpu", linear_backend="torch").linear_kernels == 0
    assert model[0].kernel is None
    assert install_kernels(model, torch.float32, "cpu", linear_backend="cpu").linear_kernels == 1
    assert install_kernels(model, torch.float32, "cpu", linear_backend="torch").linear_kernels == 0
    assert model[0].kernel is None  # a second plan replaces the first
    half = torch.nn.Sequential(Linear(16, 8)).half()
    with pytest.raises(ValueError, match="linear_backend 'cpu'"):
        install_kernels(half, torch.float16, "cpu", linear_backend="cpu")
    with pytest.raises(ValueError, match="linear_backend"):
        EngineConfig(linear_backend="mkl")


def test_bf16_goes_to_the_kernel_at_every_row_count_unless_amx(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch's bf16 GEMM is slower than the kernel with and without AVX-512 BF16 (docs/PERFORMANCE.md);
    only AMX tiles are expected to beat it on large products."""
    monkeypatch.setattr(cpu_linear, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    assert cpu_linear.max_rows(torch.bfloat16) == cpu_linear.NO_LIMIT
    assert cpu_linear.max_rows(torch.float32) == cpu_linear.MAX_ROWS_FP32
    monkeypatch.setattr(cpu_linear, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16", "amx_bf16"}))
    assert cpu_linear.max_rows(torch.bfloat16) == cpu_linear.MAX_ROWS_FP32


@pytest.mark.parametrize("m", [1, 3, 16, 100])
@pytest.mark.parametrize("n,k", [(576, 1536), (70, 40), (33, 77)])
def test_fused_silu_equals_silu_and_mul_then_linear(m: int, n: int, k: int) -> None:
    """Where the library has the fused SiLU (bf16 on AVX-512 BF16), the down projection of [gate | up]
    gives the same bf16 values as silu_and_mul followed by the product: both round where a bf16 model
    rounds. Elsewhere Linear.forward_silu_and_mul falls back to the two calls."""
    from kvserve.layers import cpu_pointwise
    from kvserve.layers.activation import silu_and_mul

    gen = torch.Generator().manual_seed(m * 1000 + n + k)
    layer = Linear(k, n, bias=True).bfloat16()
    layer.weight.data.normal_(generator=gen)
    layer.bias.data.normal_(generator=gen)
    install_kernels(layer, torch.bfloat16, "cpu")
    x = (torch.randn(m, 2 * k, generator=gen) * 3).bfloat16()
    got = layer.forward_silu_and_mul(x)
    gate, up = x.float().chunk(2, dim=-1)
    reference = F.linear((F.silu(gate).bfloat16().float() * up).bfloat16().double(), layer.weight.double(), layer.bias.double())
    torch.testing.assert_close(got.double(), reference, atol=2e-2 * k**0.5, rtol=2e-2)
    # with the fused kernel, and the pointwise kernel's 16-lane loop covering every value: bit for bit
    if layer.kernel.silu_fn is not None and cpu_pointwise.available(x) and k % 16 == 0:
        assert torch.equal(got, layer(silu_and_mul(x)))
