"""LLM: the offline interface. Give it prompts, get RequestOutputs back in the same order."""

from __future__ import annotations

import itertools
import time
from typing import Any, Sequence

from tqdm import tqdm

from kvserve.config import EngineConfig
from kvserve.engine.data_parallel_engine import make_engine
from kvserve.entrypoints.chat import render_chat
from kvserve.outputs import BeamSearchOutput, BeamSearchSequence, RequestOutput
from kvserve.sampling_params import BeamSearchParams, SamplingParams

PromptType = str | dict[str, Any]  # vLLM's prompt forms: text, {"prompt": text} or {"prompt_token_ids": ids}


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

    def get_default_sampling_params(self) -> SamplingParams:
        """What `generate` samples with when given no SamplingParams: the model's generation_config.json defaults
        (`generation_config="auto"`, as in vLLM), else SamplingParams' own."""
        return SamplingParams(**self.llm_engine.sampling_defaults)

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType] | None = None,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        prompt_token_ids: Sequence[Sequence[int]] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Complete each prompt: a string, or vLLM's `{"prompt": text}` / `{"prompt_token_ids": ids}` dicts.
        `prompt_token_ids` (vLLM's older keyword) gives the ids of `prompts`, or stands in for them."""
        if prompts is None and prompt_token_ids is None:
            raise ValueError("generate() needs prompts or prompt_token_ids")
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        if prompts is None:
            inputs = [_as_input(list(ids), i) for i, ids in enumerate(prompt_token_ids or [])]
        else:
            inputs = [_as_input(p, i) for i, p in enumerate(prompts)]
            if prompt_token_ids is not None:
                if len(prompts) != len(prompt_token_ids):
                    raise ValueError("prompts and prompt_token_ids must have the same length")
                inputs = [(text, list(ids)) for (text, _), ids in zip(inputs, prompt_token_ids)]
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        params = [sampling_params] * len(inputs) if isinstance(sampling_params, SamplingParams) else list(sampling_params)
        if len(params) != len(inputs):
            raise ValueError(f"got {len(params)} sampling_params for {len(inputs)} prompts")
        return self._run(self._add_all(inputs, params), use_tqdm)

    def chat(
        self,
        messages: Sequence[dict[str, Any]] | Sequence[Sequence[dict[str, Any]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> list[RequestOutput]:
        """Answer one conversation (a list of `{"role", "content"}` messages) or several (a list of such lists),
        each rendered with `chat_template` (default: the tokenizer's) as vLLM's `LLM.chat` does; one
        RequestOutput per conversation, its `prompt` the rendered text."""
        if not messages:
            raise ValueError("messages must hold a conversation (a list of messages) or a list of conversations")
        conversations = [messages] if isinstance(messages[0], dict) else list(messages)
        tokenizer = self._tokenizer("chat()")
        prompts: list[PromptType] = []
        for i, conversation in enumerate(conversations):
            try:
                text = render_chat(tokenizer, list(conversation), chat_template, add_generation_prompt,
                                   continue_final_message, chat_template_kwargs)
            except Exception as exc:  # the template raising on this conversation (roles out of order, ...)
                raise ValueError(f"conversation {i} of {len(conversations)}: cannot render it with the chat "
                                 f"template: {exc}") from exc
            prompts.append({"prompt": text, "prompt_token_ids": tokenizer(text, add_special_tokens=False).input_ids})
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def beam_search(
        self,
        prompts: Sequence[PromptType | list[int]],
        params: BeamSearchParams,
        use_tqdm: bool = False,
    ) -> list[BeamSearchOutput]:
        """Beam search for each prompt (a string, token ids, or vLLM's {"prompt": text} / {"prompt_token_ids": [...]}).

        The beams of a prompt share its KV blocks and fork copy-on-write; see
        `BeamSearchParams` for the transformers settings it reproduces.
        """
        if not isinstance(params, BeamSearchParams):
            raise ValueError(f"params must be a BeamSearchParams, got {type(params).__name__}")
        inputs = [_as_input(p, i) for i, p in enumerate(prompts)]
        outputs = self._run(self._add_all(inputs, [params] * len(inputs)), use_tqdm)
        decode = self._tokenizer("beam_search()").decode
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

    def _tokenizer(self, caller: str) -> Any:
        tokenizer = self.llm_engine.tokenizer
        if tokenizer is None:
            raise ValueError(f"{caller} needs the tokenizer, which skip_tokenizer_init=True left unloaded")
        return tokenizer

    def _add_all(self, inputs: list[tuple[str | None, list[int] | None]], params: list[Any]) -> list[str]:
        """Queue every prompt, or none: a bad one aborts those already queued and raises a ValueError naming it."""
        engine = self.llm_engine
        ids = [f"offline-{next(self._counter)}" for _ in inputs]
        for i, (rid, (text, token_ids), p) in enumerate(zip(ids, inputs, params)):
            try:
                engine.add_request(rid, text, p, prompt_token_ids=token_ids)
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


def _as_input(prompt: Any, index: int) -> tuple[str | None, list[int] | None]:
    """One prompt in any of vLLM's forms as (text, token ids): a string; `{"prompt": text}`;
    `{"prompt_token_ids": ids}` (a `"prompt"` beside them is kept as their text); or a list of token ids."""
    if isinstance(prompt, str):
        return prompt, None
    if isinstance(prompt, (list, tuple)):
        return None, list(prompt)
    if isinstance(prompt, dict):
        unknown = sorted(set(prompt) - {"prompt", "prompt_token_ids"}, key=str)
        if unknown:
            raise ValueError(f"prompt {index}: unsupported key(s) {', '.join(map(repr, unknown))}; a prompt dict "
                             'holds "prompt" (text) and/or "prompt_token_ids" (a list of ints)')
        text = prompt.get("prompt")
        if text is not None and not isinstance(text, str):
            raise ValueError(f'prompt {index}: "prompt" must be a string, got {type(text).__name__}')
        if "prompt_token_ids" in prompt:
            token_ids = prompt["prompt_token_ids"]
            if not isinstance(token_ids, (list, tuple)):
                raise ValueError(f'prompt {index}: "prompt_token_ids" must be a list of ints, got {type(token_ids).__name__}')
            return text, list(token_ids)
        if text is None:
            raise ValueError(f'prompt {index}: a prompt dict needs "prompt" (text) or "prompt_token_ids" (a list of ints)')
        return text, None
    raise ValueError(f'prompt {index} must be a string, a list of token ids, or a dict with "prompt" or '
                     f'"prompt_token_ids", got {type(prompt).__name__}')
