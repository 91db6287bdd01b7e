"""Rotary position embedding (RoPE), half-split layout as in Hugging Face Llama.

Inverse frequencies come from `transformers`' own RoPE initialisers, so every
`rope_scaling` type it knows (linear, llama3, yarn, ...) gives exactly its numbers.
cos/sin are precomputed for every position below the model's length once and looked up
per token. On CPU the rotation is one fused in-place call (layers/cpu_pointwise.py).

A streaming model (attention sinks, attention/attention_sinks.py) stores keys rotated by their
text positions, which grow without bound: `unbounded` rotary embeddings compute the cos/sin rows of
a step whose positions pass the table on the fly, from float64 angles (float32 angles lose 0.06 rad
at position 10^6, and only the difference of two positions is meant to matter).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kvserve.layers import cpu_pointwise


def rope_parameters(config: Any) -> dict:
    params = getattr(config, "rope_parameters", None)
    if params:
        return dict(params)
    params = dict(getattr(config, "rope_scaling", None) or {})
    params.setdefault("rope_type", params.get("type", "default"))
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    return params


def inverse_frequencies(config: Any, head_dim: int) -> tuple[torch.Tensor, float]:
    params = rope_parameters(config)
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        base = params["rope_theta"]
        return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim)), 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"rope type {rope_type!r} is not supported; known: {sorted(ROPE_INIT_FUNCTIONS)}")
    return ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))


class RotaryEmbedding(nn.Module):
    def __init__(self, config: Any, head_dim: int, max_positions: int) -> None:
        super().__init__()
        inv_freq, scaling = inverse_frequencies(config, head_dim)
        t = torch.arange(max_positions, dtype=torch.float)
        freqs = torch.outer(t, inv_freq)
        self.register_buffer("cos", freqs.cos() * scaling, persistent=False)
        self.register_buffer("sin", freqs.sin() * scaling, persistent=False)
        self.register_buffer("inv_freq", inv_freq.double(), persistent=False)
        self.scaling = scaling
        self.unbounded = False  # positions may pass the table (a streaming model); checked per step only then

    def _tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rows, cos, sin) such that cos[rows], sin[rows] belong to `positions`: the precomputed tables, or
        for positions past them this step's own rows, from float64 angles."""
        if not self.unbounded or positions.numel() == 0 or int(positions.max()) < self.cos.shape[0]:
            return positions, self.cos, self.sin
        freqs = torch.outer(positions.double(), self.inv_freq)
        rows = torch.arange(len(positions), device=positions.device)
        return rows, (freqs.cos() * self.scaling).float(), (freqs.sin() * self.scaling).float()

    def rotate(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x: [T, H, D] rotated to `positions`, as a new tensor."""
        rows, cos, sin = self._tables(positions)
        return _rotate(x, cos[rows].unsqueeze(1).to(x.dtype), sin[rows].unsqueeze(1).to(x.dtype))

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [T, Hq, D], k: [T, Hkv, D] -> rotated, computed in the input dtype like HF.

        The fused CPU path rotates q and k in place (they are views of this step's fresh
        qkv projection); the torch path returns rotated copies.
        """
        positions, cos, sin = self._tables(positions)
        if (
            cpu_pointwise.available(q)
            and k.dtype == q.dtype
            and positions.dtype == torch.int64
            and positions.is_contiguous()
            and q.stride(2) == 1 and q.stride(1) == q.shape[2]
            and k.stride(2) == 1 and k.stride(1) == k.shape[2]
        ):
            cpu_pointwise.rotary_(positions, q, k, cos, sin)
            return q, k
        cos = cos[positions].unsqueeze(1).to(q.dtype)
        sin = sin[positions].unsqueeze(1).to(q.dtype)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
