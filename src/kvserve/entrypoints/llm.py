"""LLM: the offline interface. Give it prompts, get RequestOutputs back in the same order."""

from __future__ import annotations

import itertools
import time
from typing import Any, Sequence

from tqdm import tqdm

from kvserve.config import EngineConfig
from kvserve.engine.data_parallel_engine import make_engine
from kvserve.outputs import BeamSearchOutput, BeamSearchSequence, RequestOutput
from kvserve.sampling_params import BeamSearchParams, SamplingParams


class LLM:
    """`LLM(model=None)` loads the built-in default model; any EngineConfig field is a keyword.

    Bad input is refused before anything runs: `generate` raises a ValueError naming the
    prompt's index and the parameter, and queues nothing. A request that fails inside an
    engine step (a fault of the engine that only its input triggers) does not take the
    others with it: its `RequestOutput` comes back with `error` set and finish_reason
    "error", in its place among the others.
    """

    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        self.llm_engine = make_engine(EngineConfig(model=model, **kwargs))
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

        token_ids = [list(t) for t in prompt_token_ids] if prompts is not None and prompt_token_ids is not None else None
        return self._run(self._add_all(inputs, params, token_ids), use_tqdm)

    def beam_search(
        self,
        prompts: Sequence[str | list[int] | dict[str, Any]],
        params: BeamSearchParams,
        use_tqdm: bool = False,
    ) -> list[BeamSearchOutput]:
        """Beam search for each prompt (a string, token ids, or vLLM's {"prompt_token_ids": [...]}).

        The beams of a prompt share its KV blocks and fork copy-on-write; see
        `BeamSearchParams` for the transformers settings it reproduces.
        """
        if not isinstance(params, BeamSearchParams):
            raise ValueError(f"params must be a BeamSearchParams, got {type(params).__name__}")
        inputs = [p["prompt_token_ids"] if isinstance(p, dict) else p for p in prompts]
        outputs = self._run(self._add_all(inputs, [params] * len(inputs), None), use_tqdm)
        decode = self.llm_engine.tokenizer.decode
        results = []
        for out in outputs:
            prompt_ids = out.prompt_token_ids
            beams = [
                BeamSearchSequence(
                    tokens=prompt_ids + c.token_ids,
                    text=decode(prompt_ids + c.token_ids, skip_special_tokens=True),
                    cum_logprob=c.cumulative_logprob,
                    score=c.cumulative_logprob / len(c.token_ids) ** params.length_penalty,
                    finish_reason=c.finish_reason,
                    num_prompt_tokens=len(prompt_ids),
                )
                for c in out.outputs
            ]
            results.append(BeamSearchOutput(beams))
        return results

    def _add_all(self, inputs: list[Any], params: list[Any], prompt_token_ids: list[list[int]] | None) -> list[str]:
        """Queue every prompt, or none: a bad one aborts those already queued and raises a ValueError naming it."""
        engine = self.llm_engine
        ids = [f"offline-{next(self._counter)}" for _ in inputs]
        for i, (rid, prompt, p) in enumerate(zip(ids, inputs, params)):
            try:
                engine.add_request(rid, prompt, p, prompt_token_ids=prompt_token_ids[i] if prompt_token_ids else None)
            except Exception as exc:
                for queued in ids[:i]:
                    engine.abort_request(queued)
                if isinstance(exc, ValueError):
                    raise ValueError(f"prompt {i} of {len(ids)}: {exc}") from exc
                raise
        return ids

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
                    generated += sum(len(ids) for ids in out.new_token_ids)
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
