"""kvserve: a readable, measured LLM inference engine."""

from kvserve.config import EngineConfig
from kvserve.engine.llm_engine import LLMEngine
from kvserve.entrypoints.llm import LLM
from kvserve.outputs import BeamSearchOutput, BeamSearchSequence, CompletionOutput, Logprob, RequestOutput
from kvserve.sampling_params import BeamSearchParams, SamplingParams

__all__ = [
    "LLM", "LLMEngine", "EngineConfig", "SamplingParams", "BeamSearchParams", "RequestOutput", "CompletionOutput",
    "Logprob", "BeamSearchOutput", "BeamSearchSequence",
]
__version__ = "0.1.0"
