"""ExternalLauncherExecutor: every rank runs the same program under torchrun (vLLM's external_launcher).

    torchrun --nproc-per-node 2 my_script.py        # my_script builds LLM(..., tensor_parallel_size=2,
                                                    #   distributed_executor_backend="external_launcher")

Each process is one rank: torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, ...) makes the
torch.distributed world, and each holds a whole engine — tokenizer, scheduler — with its own
`Worker` for its shard. The engines stay identical because they get the same requests in the
same order and the same step results: after each step the output rank (tp rank 0 of the last
stage) broadcasts its sampled tokens to every rank. The ranks of one machine share its CPUs as
MultiprocExecutor's do (executor/cpu_share.py). Across machines this is
`torchrun --nnodes 2 --node-rank R --rdzv-backend c10d --rdzv-endpoint HOST:PORT ...` on each.
"""

from __future__ import annotations

import gc
import logging
import os
from dataclasses import replace
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from kvserve.config import EngineConfig
from kvserve.distributed.parallel_state import init_model_parallel
from kvserve.engine.runner_output import ModelRunnerOutput
from kvserve.engine.scheduler_output import SchedulerOutput
from kvserve.executor.abstract import Executor, WorkerInfo
from kvserve.executor.cpu_share import share_cpus
from kvserve.executor.worker import Worker

logger = logging.getLogger("kvserve")

_TIMEOUT_S = float(os.environ.get("KVSERVE_DIST_TIMEOUT_S", "600"))


class ExternalLauncherExecutor(Executor):
    def __init__(self, config: EngineConfig, hf_config: Any, model_path: str, eos_token_ids: set[int]) -> None:
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise ValueError("distributed_executor_backend 'external_launcher' runs under torchrun (RANK and WORLD_SIZE "
                             "are not set); use 'mp' to start the ranks from this process")
        world = int(os.environ["WORLD_SIZE"])
        if world != config.world_size:
            raise ValueError(f"torchrun started {world} processes, but tensor_parallel_size x pipeline_parallel_size is "
                             f"{config.world_size}; they must be equal")
        cuda = config.device.startswith("cuda")
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=_TIMEOUT_S))
        self.rank = dist.get_rank()
        self.objects = dist.new_group(backend="gloo") if cuda else dist.group.WORLD  # Python objects travel on gloo
        layout = config.rank_layout()
        self.output_rank = next(rank for rank, context in enumerate(layout) if context.is_output_rank)
        parallel = init_model_parallel(self.rank, layout)
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        threads, cores = share_cpus(config, local)
        core_set = cores[int(os.environ.get("LOCAL_RANK", "0")) % local]
        if core_set:
            os.sched_setaffinity(0, core_set)
        self.worker = Worker(replace(config, num_threads=threads), hf_config, model_path, eos_token_ids, parallel, local)

    def _agree(self, value: Any, reduce: Any = None) -> Any:
        """The output rank's `value` on every rank (or `reduce` of every rank's)."""
        if reduce is not None:
            values: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(values, value, group=self.objects)
            return reduce(values)
        box = [value]
        dist.broadcast_object_list(box, src=self.output_rank, group=self.objects)
        return box[0]

    def available_kv_cache_memory(self) -> int:
        return self._agree(self.worker.available_kv_cache_memory(), min)

    def initialize_cache(self, num_blocks: int) -> None:
        self.worker.initialize_cache(num_blocks)
        self.num_blocks = num_blocks

    def execute(self, output: SchedulerOutput) -> ModelRunnerOutput:
        return self._agree(self.worker.execute_model(output))

    def info(self) -> WorkerInfo:
        return self._agree(self.worker.info())

    def shutdown(self) -> None:
        """Leave together, then free every process group while the interpreter is still whole.

        A gloo group's threads drop a finished collective's tensors after the caller's wait returns, and
        dropping a tensor made in Python takes the GIL; a thread that asks for it while the interpreter
        is finalizing is ended by pthread_exit, which aborts the process ("terminate called without an
        active exception"; about one torchrun launch in twelve on a loaded 2-core machine). A group's
        threads are joined when its last reference goes, so: barrier, destroy the groups, drop the model
        that holds them (its layers keep the tensor-parallel group), and collect."""
        if not dist.is_initialized():
            return
        dist.barrier(group=self.objects)
        dist.destroy_process_group()
        del self.worker, self.objects
        gc.collect()
