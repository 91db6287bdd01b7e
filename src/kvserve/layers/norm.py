"""RMSNorm (Llama family) with an optional fused residual add.

On CPU (fp32/bf16) both are one fused kernel call (layers/cpu_pointwise.py), which
adds the residual in place: `residual` must not be needed by the caller afterwards.
"""

from __future__ import annotations

import torch
from torch import nn

from kvserve.layers import cpu_pointwise


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Without `residual`: norm(x). With it: (norm(x + residual), x + residual)."""
        if cpu_pointwise.available(x) and self.weight.dtype == x.dtype and (
            residual is None or (residual.dtype == x.dtype and residual.is_contiguous())
        ):
            out = cpu_pointwise.rms_norm(x, residual, self.weight, self.eps)
            return out if residual is None else (out, residual)
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x
