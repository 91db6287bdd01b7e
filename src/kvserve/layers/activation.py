"""Activations: SiLU-gated MLP input and GPT-2's tanh GELU."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvserve.layers import cpu_pointwise


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x = [gate | up] along the last dim -> silu(gate) * up (one fused call on CPU)."""
    if cpu_pointwise.available(x):
        return cpu_pointwise.silu_and_mul(x)
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def gelu_new(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")
