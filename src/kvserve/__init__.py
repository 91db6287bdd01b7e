"""kvserve: a readable, measured LLM inference engine.

The public names are imported on first use (PEP 562), not with the package: they
pull in torch and transformers (about a second), which `kvserve --help`, `kvserve
--version` and the estimate's argument parsing never need.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvserve.config import EngineConfig
    from kvserve.engine.llm_engine import LLMEngine
    from kvserve.entrypoints.llm import LLM
    from kvserve.outputs import BeamSearchOutput, BeamSearchSequence, CompletionOutput, Logprob, RequestOutput
    from kvserve.sampling_params import BeamSearchParams, SamplingParams

_MODULE_OF = {
    "LLM": "kvserve.entrypoints.llm",
    "LLMEngine": "kvserve.engine.llm_engine",
    "EngineConfig": "kvserve.config",
    "SamplingParams": "kvserve.sampling_params",
    "BeamSearchParams": "kvserve.sampling_params",
    "RequestOutput": "kvserve.outputs",
    "CompletionOutput": "kvserve.outputs",
    "Logprob": "kvserve.outputs",
    "BeamSearchOutput": "kvserve.outputs",
    "BeamSearchSequence": "kvserve.outputs",
}
__all__ = [
    "LLM", "LLMEngine", "EngineConfig", "SamplingParams", "BeamSearchParams", "RequestOutput", "CompletionOutput",
    "Logprob", "BeamSearchOutput", "BeamSearchSequence",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'kvserve' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
