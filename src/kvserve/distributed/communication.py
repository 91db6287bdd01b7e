"""The collectives the parallel layers call, on this rank's tensor-parallel group (no-ops at tp_size 1)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from kvserve.distributed.parallel_state import ParallelContext


def all_reduce(x: torch.Tensor, parallel: ParallelContext) -> torch.Tensor:
    """Sum `x` over the tp ranks, in place."""
    if parallel.tp_size > 1:
        dist.all_reduce(x, group=parallel.tp_group)
    return x


def all_gather_last_dim(x: torch.Tensor, parallel: ParallelContext) -> torch.Tensor:
    """The tp ranks' `x` side by side along the last dimension (rank order)."""
    if parallel.tp_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(parallel.tp_size)]
    dist.all_gather(parts, x.contiguous(), group=parallel.tp_group)
    return torch.cat(parts, dim=-1)


def send_tensors(tensors: dict[str, torch.Tensor], parallel: ParallelContext) -> None:
    """Hand a stage's outputs to the same tp rank of the next stage (shapes are known to both sides)."""
    for name in sorted(tensors):
        dist.send(tensors[name].contiguous(), parallel.next_rank)


def recv_tensors(shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, device: torch.device, parallel: ParallelContext) -> dict[str, torch.Tensor]:
    out = {}
    for name in sorted(shapes):
        out[name] = torch.empty(shapes[name], dtype=dtype, device=device)
        dist.recv(out[name], parallel.prev_rank)
    return out
