"""Which executor runs the model: chosen by `distributed_executor_backend` (vLLM's names)."""

from __future__ import annotations

from typing import Any

from kvserve.config import EngineConfig
from kvserve.executor.abstract import Executor


def make_executor(config: EngineConfig, hf_config: Any, model_path: str, eos_token_ids: set[int]) -> Executor:
    """The executor `config.executor_backend` names: uni (this process), mp (spawned ranks) or external_launcher."""
    backend = config.executor_backend
    if backend == "mp":
        from kvserve.executor.multiproc_executor import MultiprocExecutor

        return MultiprocExecutor(config, hf_config, model_path, eos_token_ids)
    if backend == "external_launcher":
        from kvserve.executor.external_launcher_executor import ExternalLauncherExecutor

        return ExternalLauncherExecutor(config, hf_config, model_path, eos_token_ids)
    from kvserve.executor.uniproc_executor import UniprocExecutor

    return UniprocExecutor(config, hf_config, model_path, eos_token_ids)
