"""How the ranks on one machine share its CPUs: equal thread counts, each rank pinned to its own cores.

Two ranks whose threads land on the same core slow each other's every parallel region (a step
waits for its slowest thread), so on CPU each of the machine's ranks (every rank of every
data-parallel replica) gets `num_threads // ranks` threads and the cores [slot * k, (slot + 1) * k)
of those this process may use, in order. On CUDA, or with more ranks than cores, nothing is pinned.
"""

from __future__ import annotations

import os

from kvserve.config import EngineConfig


def share_cpus(config: EngineConfig, ranks: int) -> tuple[int, list[list[int] | None]]:
    """Threads per rank, and the cores of each of this replica's `ranks` local ranks (None: leave the affinity alone)."""
    total = ranks * config.data_parallel_size
    threads = max(1, config.num_threads // total)
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if config.device != "cpu" or len(cores) < total:
        return threads, [None] * ranks
    per_rank = len(cores) // total
    first = config.data_parallel_rank * ranks
    return threads, [cores[(first + r) * per_rank : (first + r + 1) * per_rank] for r in range(ranks)]
