"""The collectives the parallel layers call, on this rank's tensor-parallel group (no-ops at tp_size 1).

Each call's wall time and bytes are added to this process's `COMM` counters, which the worker
reports (`WorkerInfo.comm`): the share of a step spent communicating, measured where it happens.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from kvserve.distributed.parallel_state import ParallelContext


@dataclass
class CommStats:
    """Totals since start, per kind of call: all_reduce, all_gather, send, recv."""

    seconds: dict[str, float]
    calls: dict[str, int]
    bytes: dict[str, int]

    def add(self, kind: str, started: float, tensor: torch.Tensor) -> None:
        self.seconds[kind] = self.seconds.get(kind, 0.0) + time.perf_counter() - started
        self.calls[kind] = self.calls.get(kind, 0) + 1
        self.bytes[kind] = self.bytes.get(kind, 0) + tensor.numel() * tensor.element_size()


COMM = CommStats({}, {}, {})


def all_reduce(x: torch.Tensor, parallel: ParallelContext) -> torch.Tensor:
    """Sum `x` over the tp ranks, in place."""
    if parallel.tp_size > 1:
        started = time.perf_counter()
        dist.all_reduce(x, group=parallel.tp_group)
        COMM.add("all_reduce", started, x)
    return x


def all_gather_last_dim(x: torch.Tensor, parallel: ParallelContext) -> torch.Tensor:
    """The tp ranks' `x` side by side along the last dimension (rank order)."""
    if parallel.tp_size == 1:
        return x
    started = time.perf_counter()
    parts = [torch.empty_like(x) for _ in range(parallel.tp_size)]
    dist.all_gather(parts, x.contiguous(), group=parallel.tp_group)
    COMM.add("all_gather", started, x)
    return torch.cat(parts, dim=-1)


def send_tensors(tensors: dict[str, torch.Tensor], parallel: ParallelContext) -> None:
    """Hand a stage's outputs to the same tp rank of the next stage (shapes are known to both sides)."""
    for name in sorted(tensors):
        started = time.perf_counter()
        dist.send(tensors[name].contiguous(), parallel.next_rank)
        COMM.add("send", started, tensors[name])


def recv_tensors(shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, device: torch.device, parallel: ParallelContext) -> dict[str, torch.Tensor]:
    """The previous stage's outputs (its wait for them included: that is the pipeline's bubble on this stage)."""
    out = {}
    for name in sorted(shapes):
        started = time.perf_counter()
        out[name] = torch.empty(shapes[name], dtype=dtype, device=device)
        dist.recv(out[name], parallel.prev_rank)
        COMM.add("recv", started, out[name])
    return out
