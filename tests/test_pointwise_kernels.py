"""The fused CPU RMSNorm / SiLU·mul / rotary kernels against the torch code they replace."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig

from kvserve.layers import cpu_pointwise, token_bitmask
from kvserve.layers.norm import RMSNorm
from kvserve.layers.rotary import RotaryEmbedding, _rotate

pytestmark = pytest.mark.skipif(cpu_pointwise.load() is None, reason="the C++ pointwise kernels could not be built here")

DTYPES = [torch.float32, torch.bfloat16]


def _close(got: torch.Tensor, expected: torch.Tensor) -> None:
    assert got.dtype == expected.dtype and got.shape == expected.shape
    if got.dtype == torch.bfloat16:  # one bf16 rounding step apart at most
        torch.testing.assert_close(got.float(), expected.float(), atol=1e-2, rtol=1.6e-2)
    else:
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,hidden", [(1, 576), (3, 13), (40, 64)])
def test_rms_norm_with_and_without_residual(dtype: torch.dtype, rows: int, hidden: int) -> None:
    gen = torch.Generator().manual_seed(rows + hidden)
    norm = RMSNorm(hidden, eps=1e-5).to(dtype)
    norm.weight.data = torch.randn(hidden, generator=gen).to(dtype)
    x = torch.randn(rows, hidden, generator=gen).to(dtype)
    residual = torch.randn(rows, hidden, generator=gen).to(dtype)

    _close(norm(x), norm._norm(x))
    expected_sum = x + residual
    expected = norm._norm(expected_sum)
    out, new_residual = norm(x, residual.clone())
    _close(new_residual, expected_sum)
    _close(out, expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,inner", [(1, 1536), (5, 7), (33, 24)])
def test_silu_and_mul(dtype: torch.dtype, rows: int, inner: int) -> None:
    x = (torch.randn(rows, 2 * inner, generator=torch.Generator().manual_seed(inner)) * 4).to(dtype)
    gate, up = x.chunk(2, dim=-1)
    _close(cpu_pointwise.silu_and_mul(x), F.silu(gate) * up)


def test_silu_handles_extreme_inputs() -> None:
    x = torch.tensor([[-1000.0, -90.0, 0.0, 90.0, 1000.0, -20.0, 3.0, 1e-30, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    gate, up = x.chunk(2, dim=-1)
    _close(cpu_pointwise.silu_and_mul(x), F.silu(gate) * up)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (4, 4, 80), (2, 1, 72)])
def test_rotary_in_place_on_fused_qkv_views(dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int) -> None:
    config = LlamaConfig(hidden_size=heads * head_dim, num_attention_heads=heads, rope_theta=10000.0)
    rotary = RotaryEmbedding(config, head_dim, max_positions=512)
    tokens = 19
    q_size, kv_size = heads * head_dim, kv_heads * head_dim
    qkv = torch.randn(tokens, q_size + 2 * kv_size, generator=torch.Generator().manual_seed(head_dim)).to(dtype)
    positions = torch.randint(0, 512, (tokens,), generator=torch.Generator().manual_seed(1))
    q, k, _ = qkv.split([q_size, kv_size, kv_size], dim=-1)
    q, k = q.view(tokens, heads, head_dim), k.view(tokens, kv_heads, head_dim)
    cos = rotary.cos[positions].unsqueeze(1).to(dtype)
    sin = rotary.sin[positions].unsqueeze(1).to(dtype)
    expected_q, expected_k = _rotate(q, cos, sin), _rotate(k, cos, sin)

    got_q, got_k = rotary(positions, q, k)
    assert got_q.data_ptr() == q.data_ptr()  # rotated in place, in the qkv buffer
    _close(got_q, expected_q)
    _close(got_k, expected_k)


def test_layers_use_torch_when_kernels_are_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_pointwise, "available", lambda x: False)
    norm = RMSNorm(8)
    x, residual = torch.randn(2, 8), torch.randn(2, 8)
    out, new_residual = norm(x, residual)
    assert new_residual is not residual  # the torch path does not write in place
    _close(out, norm._norm(x + residual))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [3, 8, 13, 17, 40, 49152])
def test_argmax_logsumexp_matches_torch(vocab: int, dtype: torch.dtype) -> None:
    logits = torch.randn(6, vocab, generator=torch.Generator().manual_seed(vocab)) * 10
    logits[1] = -1e4 + logits[1]  # far from 0: the log-normalizer must not under- or overflow
    logits[2, :] = 1.5  # all tied: the first index, as torch.argmax
    if vocab > 9:
        logits[3, 2] = logits[3, 9] = logits[3].max() + 1  # a tie across lanes
    if vocab > 35:
        logits[4, 35] = logits[4, 3] = logits[4].max() + 1  # a tie in one lane of two vectors, the later one first in memory order
    logits = logits.to(dtype)
    index, lse = cpu_pointwise.argmax_logsumexp(logits)
    assert torch.equal(index, logits.float().argmax(dim=-1))
    torch.testing.assert_close(lse, torch.logsumexp(logits.float(), dim=-1), atol=1e-4, rtol=1e-5)


def test_bitmask_kernel_equals_torch() -> None:
    """Structured output's token mask (csrc/token_bitmask.cpp) against its torch twin, the tail past whole vectors
    included (vocab 1000)."""
    assert token_bitmask.load() is not None
    torch.manual_seed(0)
    vocab, rows = 1000, [0, 2, 3]
    logits = torch.randn(4, vocab)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (3, (vocab + 31) // 32), dtype=torch.int32)
    fast, slow = logits.clone(), logits.double()
    token_bitmask.apply_token_bitmask_(fast, bitmask, rows)
    token_bitmask.apply_token_bitmask_(slow, bitmask, rows)  # float64: the torch path
    assert torch.equal(fast, slow.float())
    allowed = (bitmask[:, :, None] >> torch.arange(32, dtype=torch.int32) & 1).bool().view(3, -1)[:, :vocab]
    assert torch.equal(torch.isinf(fast[rows]), ~allowed) and torch.equal(fast[1], logits[1])
