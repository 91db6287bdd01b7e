"""LLM: the offline interface. Give it prompts, get RequestOutputs back in the same order."""

from __future__ import annotations

import itertools
import time
from typing import Any, Sequence

from tqdm import tqdm

from kvserve.config import EngineConfig
from kvserve.engine.llm_engine import LLMEngine
from kvserve.outputs import RequestOutput
from kvserve.sampling_params import SamplingParams


class LLM:
    """`LLM(model=None)` loads the built-in default model; any EngineConfig field is a keyword."""

    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        self.llm_engine = LLMEngine(EngineConfig(model=model, **kwargs))
        self._counter = itertools.count()

    def get_tokenizer(self) -> Any:
        return self.llm_engine.tokenizer

    def generate(
        self,
        prompts: str | Sequence[str] | None = None,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        prompt_token_ids: Sequence[Sequence[int]] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        if prompts is None and prompt_token_ids is None:
            raise ValueError("generate() needs prompts or prompt_token_ids")
        if isinstance(prompts, str):
            prompts = [prompts]
        inputs: list[Any] = list(prompts) if prompts is not None else [list(ids) for ids in prompt_token_ids]
        if prompts is not None and prompt_token_ids is not None and len(prompts) != len(prompt_token_ids):
            raise ValueError("prompts and prompt_token_ids must have the same length")
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = [sampling_params] * len(inputs) if isinstance(sampling_params, SamplingParams) else list(sampling_params)
        if len(params) != len(inputs):
            raise ValueError(f"got {len(params)} sampling_params for {len(inputs)} prompts")

        engine = self.llm_engine
        ids = [f"offline-{next(self._counter)}" for _ in inputs]
        try:
            for i, (rid, prompt, p) in enumerate(zip(ids, inputs, params)):
                token_ids = list(prompt_token_ids[i]) if prompts is not None and prompt_token_ids is not None else None
                engine.add_request(rid, prompt, p, prompt_token_ids=token_ids)
        except Exception:
            for rid in ids:
                engine.abort_request(rid)
            raise
        return self._run(ids, use_tqdm)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        engine = self.llm_engine
        wanted = set(ids)
        done: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="Processed prompts", unit="req", disable=not use_tqdm, dynamic_ncols=True)
        started = time.perf_counter()
        generated = 0
        try:
            while len(done) < len(ids) and engine.has_unfinished_requests():
                for out in engine.step():
                    if out.request_id not in wanted:
                        continue
                    generated += len(out.new_token_ids[0])
                    if out.finished:
                        done[out.request_id] = out
                        bar.update(1)
                elapsed = time.perf_counter() - started
                bar.set_postfix_str(f"output {generated / max(elapsed, 1e-9):.1f} tok/s", refresh=False)
        finally:
            bar.close()
            for rid in wanted - done.keys():
                engine.abort_request(rid)
        return [done[rid] for rid in ids]
