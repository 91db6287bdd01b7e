"""MultiprocExecutor: one spawned worker process per rank; the engine process holds no model.

    engine process ──send(command)──► worker 0 … worker N-1   (ObjectChannel, gloo, point to point)
                   ◄──send(reply)───  every worker            (the output rank's is the result)
    workers among themselves: all-reduce / all-gather (tensor parallel), send/recv (pipeline), on their
    own torch.distributed world (gloo on CPU, NCCL on CUDA)

Every command goes to every worker and every worker answers, so the engine notices any
rank's failure in the same step: a command that raised comes back as a `WorkerFailure` (raised here
as a RuntimeError, which the engine treats like any failed step), and a worker that died closes
its gloo connection, which ends the wait at once (`ExecutorDeadError`, a fault no request explains).

On CPU each worker gets an equal share of the threads and is pinned to its own cores
(executor/cpu_share.py), so ranks never compete for a core.
"""

from __future__ import annotations

import logging
import multiprocessing
from collections import deque
import os
import shutil
import tempfile
import weakref
from dataclasses import replace
from typing import Any

from kvserve.config import EngineConfig
from kvserve.distributed.object_channel import ObjectChannel, PendingSend
from kvserve.engine.runner_output import ModelRunnerOutput
from kvserve.engine.scheduler_output import SchedulerOutput
from kvserve.executor.abstract import Executor, ExecutorDeadError, WorkerInfo
from kvserve.executor.cpu_share import share_cpus
from kvserve.executor.worker_process import WorkerFailure, WorkerLaunch, run_worker

logger = logging.getLogger("kvserve")

_COLLECTIVE_TIMEOUT_S = float(os.environ.get("KVSERVE_DIST_TIMEOUT_S", "600"))
_SHUTDOWN_WAIT_S = 5.0


class MultiprocExecutor(Executor):
    def __init__(self, config: EngineConfig, hf_config: Any, model_path: str, eos_token_ids: set[int]) -> None:
        self.world_size = config.world_size
        self.output_rank = self.world_size - config.tensor_parallel_size  # tp rank 0 of the last stage
        self._dir = tempfile.mkdtemp(prefix="kvserve-workers-")
        threads, cores = share_cpus(config, self.world_size)
        context = multiprocessing.get_context("spawn")
        self.processes = []
        for rank in range(self.world_size):
            launch = WorkerLaunch(
                rank, self.world_size, os.path.join(self._dir, "channel"), os.path.join(self._dir, "world"),
                replace(config, num_threads=threads), hf_config, model_path, eos_token_ids, cores[rank],
                self.world_size * config.data_parallel_size,
                logging.getLogger("kvserve").getEffectiveLevel(), _COLLECTIVE_TIMEOUT_S,
            )
            process = context.Process(target=run_worker, args=(launch,), name=f"kvserve-rank-{rank}", daemon=True)
            process.start()
            self.processes.append(process)
        self._told_to_stop: list[bool] = []  # non-empty once the workers were asked to leave their loop
        self._finalizer = weakref.finalize(self, _stop, self.processes, self._dir, self._told_to_stop)
        replica = f" for data-parallel replica {config.data_parallel_rank}" if config.data_parallel_size > 1 else ""
        logger.info("started %d worker processes%s (tensor_parallel_size %d x pipeline_parallel_size %d), %d threads each%s",
                    self.world_size, replica, config.tensor_parallel_size, config.pipeline_parallel_size, threads,
                    f", pinned to cores {cores}" if cores[0] else "")
        self.channel = ObjectChannel(os.path.join(self._dir, "channel"), 0, self.world_size + 1)
        self._in_flight = 0  # steps submitted whose replies are still on the channel
        self._sending: deque[PendingSend] = deque()  # commands sent, until the workers have them
        self._collected: deque[ModelRunnerOutput | Exception] = deque()  # replies read early, oldest first
        failures = [reply for reply in self._gather() if isinstance(reply, WorkerFailure)]
        if failures:
            self.shutdown()
            first = failures[0]
            raise RuntimeError(f"worker rank {first.rank} could not start: {first.error}\n{first.traceback}")

    def _gather(self) -> list[Any]:
        """Every worker's reply to the last command, by rank."""
        replies = []
        for rank in range(self.world_size):
            try:
                replies.append(self.channel.recv(rank + 1))
            except RuntimeError as exc:
                raise ExecutorDeadError(f"worker rank {rank} is gone ({self._exit_codes()}): {exc}") from exc
        return replies

    def _send(self, command: str, argument: Any = None) -> None:
        dead = [p for p in self.processes if not p.is_alive()]
        if dead:
            raise ExecutorDeadError(f"worker process {dead[0].name} is gone ({self._exit_codes()})")
        try:
            self._sending.extend(self.channel.send((command, argument), rank + 1) for rank in range(self.world_size))
        except RuntimeError as exc:
            raise ExecutorDeadError(f"a worker process is gone ({self._exit_codes()}): {exc}") from exc

    def _replies(self, command: str) -> list[Any]:
        replies = self._gather()
        while self._sending and all(work.is_completed() for work in self._sending[0].works):
            self._sending.popleft().buffers = []  # every worker has answered: the commands before are delivered
        failures = [reply for reply in replies if isinstance(reply, WorkerFailure)]
        if failures:
            raise RuntimeError(f"{command} failed on worker rank {failures[0].rank}: {failures[0].error}")
        return replies

    def _call(self, command: str, argument: Any = None) -> list[Any]:
        """Run a command now and return every worker's reply (the replies of steps in flight are kept first)."""
        self._drain()
        self._send(command, argument)
        return self._replies(command)

    def _exit_codes(self) -> str:
        return ", ".join(f"{p.name}: {'running' if p.exitcode is None else f'exit code {p.exitcode}'}" for p in self.processes)

    def available_kv_cache_memory(self) -> int:
        return min(self._call("kv_memory"))

    def initialize_cache(self, num_blocks: int) -> None:
        self._call("init_cache", num_blocks)
        self.num_blocks = num_blocks

    def execute(self, output: SchedulerOutput) -> ModelRunnerOutput:
        return self._call("execute", output)[self.output_rank]

    def submit(self, output: SchedulerOutput) -> None:
        """Send a step; several may be in flight (a pipeline's virtual engines), their results come back in order."""
        self._send("execute", output)
        self._in_flight += 1

    def collect(self) -> ModelRunnerOutput:
        """The result of the oldest step submitted and not collected yet."""
        if self._collected:
            result = self._collected.popleft()
        else:
            self._in_flight -= 1
            result = self._result()
        if isinstance(result, Exception):
            raise result
        return result

    def _result(self) -> ModelRunnerOutput | Exception:
        try:
            return self._replies("execute")[self.output_rank]
        except ExecutorDeadError:
            raise
        except RuntimeError as exc:
            return exc

    def _drain(self) -> None:
        """Read the replies of the steps in flight (kept for `collect`), so that a step run now gets its own."""
        while self._in_flight:
            self._in_flight -= 1
            self._collected.append(self._result())

    def info(self) -> WorkerInfo:
        return self._call("info")[self.output_rank]

    def rank_infos(self) -> list[WorkerInfo]:
        return self._call("info")

    def time_all_reduce(self, sizes: list[int]) -> dict[int, float]:
        """Median seconds of an all-reduce of each size (elements of the model's dtype) on the first stage's tp group."""
        return self._call("time_all_reduce", sizes)[0]

    def shutdown(self) -> None:
        if not self._finalizer.alive:
            return
        try:
            if all(p.is_alive() for p in self.processes):
                self._drain()
                for rank in range(self.world_size):
                    self.channel.send(("shutdown", None), rank + 1).wait()
                self._told_to_stop.append(True)
        except RuntimeError:
            pass
        self._finalizer()


def _stop(processes: list[multiprocessing.Process], directory: str, told: list[bool]) -> None:
    """Wait for workers that were told to stop; kill the others (and any that do not leave in time)."""
    for process in processes:
        process.join(_SHUTDOWN_WAIT_S if told else 0)
        if process.is_alive():
            process.kill()
            process.join()
    shutil.rmtree(directory, ignore_errors=True)

