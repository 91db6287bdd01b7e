"""The main loop of a worker process that `MultiprocExecutor` spawned: one rank of the model.

The process joins two process groups: the engine's channel (`ObjectChannel`, the engine process
as rank 0 and this worker as rank + 1), where commands arrive in order and every worker answers
each (without waiting for the engine to take the answer: it may still be sending the next
command, distributed/object_channel.py), and the model's own world of tp x pp ranks (torch.distributed's default group: gloo on
CPU, NCCL on CUDA) for the all-reduces and the pipeline's send/recv. A command that raises is
answered with a `WorkerFailure`, and the loop goes on: the engine decides what the failure means.
"""

from __future__ import annotations

import logging
import os
import traceback
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from kvserve.config import EngineConfig


@dataclass
class WorkerLaunch:
    """What a spawned worker needs to become rank `rank` (pickled to the new process)."""

    rank: int
    world_size: int
    channel_path: str  # the engine channel's file store
    world_path: str  # the model world's file store
    config: EngineConfig  # with this rank's thread count
    hf_config: Any
    model_path: str
    eos_token_ids: set[int]
    cores: list[int] | None  # CPUs to pin this process to (None: leave the affinity alone)
    ranks_on_this_machine: int  # every rank of every replica: they share the machine's default KV memory
    log_level: int
    timeout_s: float  # of the model world's collectives


@dataclass
class WorkerFailure:
    """A worker's answer when its command raised."""

    rank: int
    error: str
    traceback: str


def run_worker(launch: WorkerLaunch) -> None:
    """Entry point of the spawned process."""

    from kvserve.distributed.object_channel import ObjectChannel
    from kvserve.distributed.parallel_state import init_model_parallel
    from kvserve.executor.worker import Worker

    logging.basicConfig(level=launch.log_level, format=f"%(asctime)s %(levelname)s [rank {launch.rank}] %(message)s")
    if launch.cores:
        os.sched_setaffinity(0, launch.cores)
    channel = ObjectChannel(launch.channel_path, launch.rank + 1, launch.world_size + 1)
    config = launch.config
    try:
        cuda = config.device.startswith("cuda")
        if cuda:
            import torch

            torch.cuda.set_device(launch.rank % torch.cuda.device_count())
        dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{launch.world_path}", rank=launch.rank,
                                world_size=launch.world_size, timeout=timedelta(seconds=launch.timeout_s))
        parallel = init_model_parallel(launch.rank, config.rank_layout())
        worker = Worker(config, launch.hf_config, launch.model_path, launch.eos_token_ids, parallel, launch.ranks_on_this_machine)
        channel.send(None, 0).wait()
    except BaseException as exc:  # the engine learns why this rank could not start
        channel.send(WorkerFailure(launch.rank, repr(exc), traceback.format_exc()), 0).wait()
        return
    handlers = {
        "kv_memory": lambda _: worker.available_kv_cache_memory(),
        "init_cache": worker.initialize_cache,
        "execute": lambda output: worker.execute_model(output) if parallel.is_output_rank else _run_quietly(worker, output),
        "info": lambda _: worker.info(),
        "time_all_reduce": lambda sizes: time_all_reduce(parallel, sizes, launch.config.torch_dtype),
    }
    replying = None
    while True:
        command, argument = channel.recv(0)
        if command == "shutdown":
            break
        try:
            reply = handlers[command](argument)
        except Exception as exc:
            logging.getLogger("kvserve").debug("command %s failed", command, exc_info=True)
            reply = WorkerFailure(launch.rank, repr(exc), traceback.format_exc())
        if replying is not None:
            replying.wait()  # the engine took the previous answer (it reads them in order)
        replying = channel.send(reply, 0)
    dist.barrier()  # leave together: tearing the group down under a rank still in it aborts that rank
    dist.destroy_process_group()


def time_all_reduce(parallel: Any, sizes: list[int], dtype: Any, repeats: int = 30) -> dict[int, float]:
    """Median seconds of an all-reduce of `size` elements on this rank's tp group, for each size (every tp rank
    runs the same calls; `kvserve estimate --validate` fits the link's latency and bandwidth to them)."""
    import statistics
    import time

    import torch

    result = {}
    for size in sizes:
        x = torch.zeros(size, dtype=dtype)
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            dist.all_reduce(x, group=parallel.tp_group)
            times.append(time.perf_counter() - started)
        result[size] = statistics.median(times)
    return result


def _run_quietly(worker: Any, output: Any) -> None:
    """A rank that does not sample runs the step and answers only that it went well."""
    worker.execute_model(output)
    return None
