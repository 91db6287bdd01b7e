"""ParallelContext: which shard of the model this rank holds, and the process groups it talks on.

Ranks are laid out tensor-parallel innermost, as in vLLM and Megatron: rank = pp_rank * tp_size +
tp_rank, so the tp_size ranks of one pipeline stage are consecutive (on one machine where possible).
A model is built with its rank's context: column-parallel layers keep 1/tp of the output rows,
row-parallel layers 1/tp of the input columns, and a pipeline stage keeps its own layers only.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any


@dataclass(frozen=True)
class ParallelContext:
    tp_rank: int = 0
    tp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1
    layer_start: int = 0  # this stage's decoder layers: [layer_start, layer_end)
    layer_end: int | None = None  # None: to the last layer
    tp_group: Any = None  # torch.distributed group of this stage's tp ranks (None when tp_size == 1)
    prev_rank: int | None = None  # global rank of the same tp rank in the previous / next stage
    next_rank: int | None = None

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def is_output_rank(self) -> bool:
        """The rank that samples and answers the driver: tp rank 0 of the last stage."""
        return self.is_last_stage and self.tp_rank == 0

    def layers(self, num_layers: int) -> range:
        return range(self.layer_start, num_layers if self.layer_end is None else self.layer_end)

    def shard(self, size: int, name: str) -> tuple[int, int]:
        """(start, length) of this rank's 1/tp part of a dimension of `size` that must divide evenly."""
        if size % self.tp_size:
            raise ValueError(f"{name} ({size}) must be divisible by tensor_parallel_size ({self.tp_size})")
        length = size // self.tp_size
        return self.tp_rank * length, length


SINGLE = ParallelContext()


def global_rank(tp_rank: int, pp_rank: int, tp_size: int) -> int:
    return pp_rank * tp_size + tp_rank


def partition_layers(num_layers: int, pp_size: int, partition: list[int] | None = None) -> list[tuple[int, int]]:
    """[start, end) of each stage's layers: `partition` (layers per stage) if given, else as even as possible,
    the first stages taking one more where the count does not divide (the last stage also runs the LM head)."""
    if partition is None:
        if num_layers < pp_size:
            raise ValueError(f"pipeline_parallel_size ({pp_size}) must be <= the number of layers ({num_layers})")
        base, extra = divmod(num_layers, pp_size)
        partition = [base + (1 if i < extra else 0) for i in range(pp_size)]
    elif len(partition) != pp_size or sum(partition) != num_layers or min(partition) < 1:
        raise ValueError(f"pp_layer_partition must be {pp_size} positive layer counts summing to {num_layers}, got {partition}")
    bounds, start = [], 0
    for count in partition:
        bounds.append((start, start + count))
        start += count
    return bounds


def kv_heads_per_rank(num_heads: int, num_kv_heads: int, tp_size: int) -> tuple[int, int]:
    """(query heads, kv heads) one tp rank holds. KV heads are split when there are at least tp_size of them,
    else replicated: each rank keeps the one its query heads use (as vLLM does)."""
    if num_heads % tp_size:
        raise ValueError(f"the number of attention heads ({num_heads}) must be divisible by tensor_parallel_size ({tp_size})")
    if num_kv_heads % tp_size and tp_size % num_kv_heads:
        raise ValueError(f"the number of KV heads ({num_kv_heads}) must divide or be divisible by "
                         f"tensor_parallel_size ({tp_size})")
    return num_heads // tp_size, max(1, num_kv_heads // tp_size)


def kv_head_start(num_kv_heads: int, tp_rank: int, tp_size: int) -> int:
    """The first KV head of the checkpoint that `tp_rank` keeps."""
    if num_kv_heads >= tp_size:
        return tp_rank * (num_kv_heads // tp_size)
    return tp_rank * num_kv_heads // tp_size  # replicated: tp_size / num_kv_heads ranks share each head


def rank_layout(num_layers: int, tp_size: int, pp_size: int, partition: list[int] | None = None) -> list[ParallelContext]:
    """Every rank's context, by global rank, without process groups (for the engine's memory arithmetic)."""
    bounds = partition_layers(num_layers, pp_size, partition)
    contexts = []
    for pp_rank, (start, end) in enumerate(bounds):
        for tp_rank in range(tp_size):
            contexts.append(ParallelContext(
                tp_rank, tp_size, pp_rank, pp_size, start, end,
                prev_rank=global_rank(tp_rank, pp_rank - 1, tp_size) if pp_rank > 0 else None,
                next_rank=global_rank(tp_rank, pp_rank + 1, tp_size) if pp_rank < pp_size - 1 else None,
            ))
    return contexts


def init_model_parallel(rank: int, layout: list[ParallelContext]) -> ParallelContext:
    """This rank's context with its tensor-parallel group. torch.distributed's default group must hold exactly
    the ranks of `layout`; every rank calls this (group creation is collective)."""
    import torch.distributed as dist

    context = layout[rank]
    if context.tp_size == 1:
        return context
    if context.pp_size == 1:
        return replace(context, tp_group=dist.group.WORLD)
    tp_group = None
    for stage in range(context.pp_size):
        group = dist.new_group([global_rank(t, stage, context.tp_size) for t in range(context.tp_size)])
        if stage == context.pp_rank:
            tp_group = group
    return replace(context, tp_group=tp_group)
