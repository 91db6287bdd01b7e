"""kvserve itself under benchmark: `LLM.generate` for workloads, `LLMEngine.step` for one stream."""

from __future__ import annotations

import argparse
import itertools
import time
from dataclasses import fields
from typing import Any

from kvserve.bench.runner import BatchRun, StreamTiming
from kvserve.bench.workload import Workload
from kvserve.config import EngineConfig
from kvserve.engine.llm_engine import LLMEngine
from kvserve.engine_args import engine_config_from_args
from kvserve.entrypoints.llm import LLM
from kvserve.models.kernel_plan import KernelPlan
from kvserve.sampling_params import SamplingParams

_RESOLVED_FIELDS = ("model", "hf_config", "torch_dtype")


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


class KvserveRunner:
    name = "kvserve"

    def __init__(self, llm: LLM) -> None:
        self.llm = llm
        self._ids = itertools.count()

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> KvserveRunner:
        """Load the model named by the engine arguments (`kvserve.engine_args.add_engine_arguments`)."""
        return cls.from_config(engine_config_from_args(args))

    @classmethod
    def from_config(cls, config: EngineConfig) -> KvserveRunner:
        kwargs = {f.name: getattr(config, f.name) for f in fields(config) if f.name not in _RESOLVED_FIELDS}
        return cls(LLM(model=config.model, **kwargs))

    @property
    def engine(self) -> LLMEngine:
        return self.llm.llm_engine

    def settings(self) -> dict[str, Any]:
        """The run's settings; the fast paths come from the model's kernel plan (models/kernel_plan.py).
        attention_backend names the backend ("auto → cpu"); before the plan it named its function
        ("auto → paged_attention_cpu")."""
        config = self.engine.config
        plan: KernelPlan = self.engine.worker_info.kernel_plan
        return {
            "model_path": self.engine.model_path,
            "dtype": str(config.torch_dtype).removeprefix("torch."),
            "load_format": config.load_format,
            "attention_backend": f"{config.attention_backend} → {plan.attention_backend}",
            "linear_backend": f"{config.linear_backend} → {plan.describe_linear()}",
            "one_call_layers": plan.describe_one_call(),
            "cpu_kernels": f"{plan.isa} (-march={plan.march})" if plan.isa else "none",
            "max_num_seqs": config.max_num_seqs,
            "max_num_batched_tokens": config.max_num_batched_tokens,
            "block_size": config.block_size,
            "kv_cache_dtype": config.kv_cache_dtype,
            "enable_chunked_prefill": config.enable_chunked_prefill,
            "enable_prefix_caching": config.enable_prefix_caching,
            "batching": "continuous",
        }

    def generate(self, workload: Workload, progress: bool) -> BatchRun:
        prompts = [r.prompt_token_ids for r in workload.requests]
        params = [greedy(r.output_len) for r in workload.requests]
        start = time.perf_counter()
        outputs = self.llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=progress)
        elapsed = time.perf_counter() - start
        return BatchRun(elapsed, [list(o.outputs[0].token_ids) for o in outputs])

    def stream(self, prompt_token_ids: list[int], max_tokens: int) -> StreamTiming:
        engine = self.engine
        request_id = f"bench-stream-{next(self._ids)}"
        timing = StreamTiming(start=time.perf_counter())
        engine.add_request(request_id, list(prompt_token_ids), greedy(max_tokens))
        try:
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if out.request_id != request_id:
                        continue
                    now = time.perf_counter()
                    for token in out.new_token_ids[0]:
                        timing.token_times.append(now)
                        timing.token_ids.append(token)
        finally:
            engine.abort_request(request_id)
        return timing
