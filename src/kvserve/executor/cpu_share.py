"""How the ranks on one machine share its CPUs: equal thread counts, each rank pinned to its own cores.

Two ranks whose threads land on the same core slow each other's every parallel region (a step
waits for its slowest thread), so on CPU each rank gets `num_threads // ranks` threads and the
cores [local_rank * k, (local_rank + 1) * k) of those this process may use, in order. On CUDA,
or with more ranks than cores, nothing is pinned.
"""

from __future__ import annotations

import os

from kvserve.config import EngineConfig


def share_cpus(config: EngineConfig, ranks: int) -> tuple[int, list[list[int] | None]]:
    """Threads per rank, and each local rank's cores (None: leave its affinity alone)."""
    threads = max(1, config.num_threads // ranks)
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if config.device != "cpu" or len(cores) < ranks:
        return threads, [None] * ranks
    per_rank = len(cores) // ranks
    return threads, [cores[r * per_rank : (r + 1) * per_rank] for r in range(ranks)]
