"""UniprocExecutor: one Worker in the engine's own process."""

from __future__ import annotations

from typing import Any

from kvserve.config import EngineConfig
from kvserve.engine.runner_output import ModelRunnerOutput
from kvserve.engine.scheduler_output import SchedulerOutput
from kvserve.executor.abstract import Executor, WorkerInfo
from kvserve.executor.worker import Worker


class UniprocExecutor(Executor):
    def __init__(self, config: EngineConfig, hf_config: Any, model_path: str, eos_token_ids: set[int]) -> None:
        self.worker = Worker(config, hf_config, model_path, eos_token_ids)

    def available_kv_cache_memory(self) -> int:
        return self.worker.available_kv_cache_memory()

    def initialize_cache(self, num_blocks: int) -> None:
        self.worker.initialize_cache(num_blocks)
        self.num_blocks = num_blocks

    def execute(self, output: SchedulerOutput) -> ModelRunnerOutput:
        return self.worker.execute_model(output)

    def info(self) -> WorkerInfo:
        return self.worker.info()
