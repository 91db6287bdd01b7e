"""EngineSnapshot: the block pool and the running sequences' block tables at one moment, as plain data.

What the live dashboard draws (entrypoints/openai/dashboard_feed.py): every block's state, and each
running sequence's table, computed and total tokens, and prefix-cache hit. The engine thread takes
it between steps (`LLMEngine.snapshot()`, asked for by `AsyncLLMEngine.request_snapshots`), so it
reads the block manager's and scheduler's state without racing them and changes none of it; the
copy is what crosses to the server's thread. A block's state is derived in one vectorized pass
over the ref counts (`BlockPoolState.states`), never block by block in Python.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# Block states, as `BlockPoolState.states` codes them.
FREE = 0  # no sequence holds it, nothing reusable in it
CACHED = 1  # no sequence holds it, but it keeps a prefix a later prompt may reuse (until evicted)
USED = 2  # held by one sequence
SHARED = 3  # held by several (a shared prefix, or forked outputs and beams before copy-on-write)

DROPPED = -1  # a table entry released behind a sliding window: no block


@dataclass(frozen=True)
class BlockPoolState:
    """Every block's ref count (sequences holding it) and whether it keeps a cached prefix."""

    ref_counts: np.ndarray  # int64 [num_blocks]
    cached: np.ndarray  # bool [num_blocks]

    @property
    def num_blocks(self) -> int:
        return int(self.ref_counts.shape[0])

    def states(self) -> np.ndarray:
        """FREE / CACHED / USED / SHARED per block (uint8 [num_blocks])."""
        refs = self.ref_counts
        return np.select([refs > 1, refs == 1, self.cached], [SHARED, USED, CACHED], FREE).astype(np.uint8)


@dataclass(frozen=True)
class SequenceSnapshot:
    """One running sequence: its block table (`DROPPED` where a sliding window released the block) and counts."""

    seq_id: int
    request_id: str
    block_table: list[int]
    num_computed_tokens: int
    num_tokens: int
    num_prompt_tokens: int
    num_cached_tokens: int  # prompt tokens served from the prefix cache at its first schedule
    num_preemptions: int


@dataclass(frozen=True)
class PoolSnapshot:
    """One scheduler's block pool and the sequences it runs."""

    block_size: int
    blocks: BlockPoolState
    sequences: list[SequenceSnapshot]
    num_waiting: int
    prefix_cache_queries: int  # prompt tokens looked up, since start
    prefix_cache_hits: int  # prompt tokens found, since start
    num_preemptions: int  # since start


@dataclass(frozen=True)
class EngineSnapshot:
    """The pools of the engine: one, or one per data-parallel replica (or pipeline virtual engine)."""

    pools: list[PoolSnapshot] = field(default_factory=list)
