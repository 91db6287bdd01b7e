"""Executor: the engine's one door to the model. It takes a SchedulerOutput and returns a ModelRunnerOutput.

The engine never touches a model, a KV cache tensor or a generator: it talks to
an executor, which runs one `Worker` per rank (in this process, in spawned
processes, or under torchrun). Everything crossing this door is plain data.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from kvserve.engine.runner_output import ModelRunnerOutput
from kvserve.engine.scheduler_output import SchedulerOutput


@dataclass
class WorkerInfo:
    """Facts about the loaded model and its cache (for the estimator's checks and for logs)."""

    num_parameters: int
    kv_cache_bytes: int  # 0 until the cache is allocated
    kernel_plan: Any = None  # what the loader installed, where it reports it
    num_sequences: int = 0  # sequences the model runner holds state for (0 once every request is done)
    comm: Any = None  # CommStats of the rank's collectives and pipeline transfers (distributed/communication.py)
    busy_seconds: float = 0.0  # time spent running steps, since start
    weight_bytes: int = 0  # what one step reads of the weights: dense parameters and GGUF blocks, as held


class ExecutorDeadError(RuntimeError):
    """A rank of the executor is gone (its process died): no step can run again."""


class Executor(ABC):
    num_blocks: int = 0  # KV blocks on every rank, once `initialize_cache` ran

    @abstractmethod
    def available_kv_cache_memory(self) -> int:
        """Bytes the KV cache may take on each rank, measured after the weights are loaded."""

    @abstractmethod
    def initialize_cache(self, num_blocks: int) -> None:
        """Allocate `num_blocks` KV blocks on every rank."""

    @abstractmethod
    def execute(self, output: SchedulerOutput) -> ModelRunnerOutput:
        """Run one step on every rank; the driver rank's sampled tokens come back."""

    def submit(self, output: SchedulerOutput) -> None:
        """Start a step; `collect()` returns its result. Executors whose ranks live in other processes return at
        once (data-parallel replicas then run their steps at the same time); here the step runs now."""
        try:
            self._submitted: tuple[ModelRunnerOutput | None, Exception | None] = (self.execute(output), None)
        except Exception as exc:
            self._submitted = (None, exc)

    def collect(self) -> ModelRunnerOutput:
        """The result of the step `submit` started (its exception, raised, if it failed)."""
        result, error = self._submitted
        if error is not None:
            raise error
        return result

    @abstractmethod
    def info(self) -> WorkerInfo:
        """What the (driver) worker holds."""

    def rank_infos(self) -> list[WorkerInfo]:
        """What every rank holds, by global rank (one entry in a single process)."""
        return [self.info()]

    def shutdown(self) -> None:
        """Release the workers (nothing to do in this process)."""

