"""POST /v1/completions: prompts (text, token ids, or lists of either) in, text completions out."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import Response

from kvserve.entrypoints.openai.protocol import CompletionChoice, CompletionLogProbs, CompletionRequest, CompletionResponse
from kvserve.entrypoints.openai.serving_engine import (
    Choices,
    OpenAIError,
    OpenAIServing,
    PromptRequest,
    SSEResponse,
    TokenLogprobs,
    bad_request,
    check_outputs,
    engine_error,
    run_until_disconnect,
    sse,
)
from kvserve.outputs import RequestOutput


@dataclass
class _Prompt:
    text: str | None
    token_ids: list[int]


class OpenAIServingCompletion(OpenAIServing):
    async def create(self, request: CompletionRequest, raw_request: Request) -> Response | CompletionResponse:
        self.check_model(request.model)
        self.check_common(request)
        if request.suffix:
            raise bad_request("suffix is not supported", "suffix")
        if request.best_of is not None and request.best_of > request.n and request.stream:
            raise bad_request("best_of > n cannot be streamed: the best n outputs are known only at the end", "best_of")
        if request.echo and request.logprobs is not None:
            raise bad_request("echo together with logprobs needs prompt logprobs, which this server does not compute", "echo")
        prompt = request.prompt
        if not prompt:
            raise bad_request("prompt must not be empty", "prompt")
        batched = not isinstance(prompt, str) and not all(isinstance(p, int) for p in prompt)
        per_prompt, param = (request.best_of, "best_of") if request.best_of is not None else (request.n, "n")
        self.check_fan_out(len(prompt) if batched else 1, per_prompt, param)
        prompts = await self.preprocess(lambda: self._prompts(prompt, request.add_special_tokens), "prompt")
        constraint, constraint_param = self.requested_constraint(request)
        await self.compile_constraint(constraint, constraint_param)
        explicit = "max_tokens" in request.model_fields_set
        renamed = {"best_of": param}  # best_of is n unless the request gave it
        requests = [
            PromptRequest(p, one.token_ids, self.sampling_params(
                request, self.max_tokens_for(len(one.token_ids), request.max_tokens, explicit, "max_tokens"), request.logprobs,
                request.best_of, renamed, constraint,
            ))
            for p, one in enumerate(prompts)
        ]
        handle = await self.submit("cmpl", requests, "prompt", renamed)
        response_id = handle.response_id
        model = self.served_model_name
        if request.stream:
            return SSEResponse(self._stream(request, handle, prompts, response_id, model), handle.abort, self.limits.stream_stall_timeout_s)
        try:
            finals = await run_until_disconnect(raw_request, handle.final_outputs())
        finally:
            handle.abort()
        if finals is None:
            return Response(status_code=499)  # the client is gone; nobody reads this
        check_outputs(finals)
        return self._response(request, finals, prompts, response_id, model)

    def _prompts(self, prompt: str | list[str] | list[int] | list[list[int]], add_special_tokens: bool) -> list[_Prompt]:
        if isinstance(prompt, str):
            return [_Prompt(prompt, self.encode(prompt, add_special_tokens))]
        if all(isinstance(p, int) for p in prompt):
            return [_Prompt(None, list(prompt))]  # type: ignore[arg-type]
        return [_Prompt(p, self.encode(p, add_special_tokens)) if isinstance(p, str) else _Prompt(None, list(p)) for p in prompt]

    def _echo_text(self, prompt: _Prompt) -> str:
        return prompt.text if prompt.text is not None else self.tokenizer.decode(prompt.token_ids)

    def _response(
        self, request: CompletionRequest, finals: dict[int, RequestOutput], prompts: list[_Prompt], response_id: str, model: str
    ) -> CompletionResponse:
        choices = []
        for p in sorted(finals):
            prefix = self._echo_text(prompts[p]) if request.echo else ""
            for i, completion in enumerate(finals[p].outputs):
                logprobs = None
                if request.logprobs is not None:
                    logprobs = self._logprobs(self.token_logprobs(finals[p], i, new_only=False), len(prefix))[0]
                choices.append(CompletionChoice(index=p * request.n + i, text=prefix + completion.text, logprobs=logprobs,
                                                finish_reason=completion.finish_reason, stop_reason=completion.stop_reason))
        usage = self.usage([len(p.token_ids) for p in prompts], list(finals.values()))
        return CompletionResponse(id=response_id, model=model, choices=choices, usage=usage)

    async def _stream(
        self, request: CompletionRequest, handle: Choices, prompts: list[_Prompt], response_id: str, model: str
    ) -> AsyncIterator[str]:
        created = int(time.time())
        offsets: dict[int, int] = {}  # text offset of the next token, per choice
        ended: set[int] = set()  # choices whose finish_reason was sent
        finals: list[RequestOutput] = []
        try:
            async for p, out in handle:
                if out.error is not None:
                    yield sse(OpenAIError(500, out.error, "internal_server_error", None, "request_failed").body.model_dump_json())
                    break
                if out.finished:
                    finals.append(out)
                for i, completion in enumerate(out.outputs):
                    index = p * request.n + i
                    if index in ended:
                        continue
                    text = out.new_text[i]
                    if index not in offsets:
                        prefix = self._echo_text(prompts[p]) if request.echo else ""
                        text = prefix + text
                        offsets[index] = len(prefix)
                    logprobs = None
                    if request.logprobs is not None and out.new_token_ids[i]:
                        logprobs, offsets[index] = self._logprobs(self.token_logprobs(out, i, new_only=True), offsets[index])
                    finished = completion.finish_reason is not None
                    if not finished and not text and logprobs is None:
                        continue  # text held back (a possible stop string, a split character)
                    if finished:
                        ended.add(index)
                    choice = CompletionChoice(
                        index=index, text=text, logprobs=logprobs,
                        finish_reason=completion.finish_reason if finished else None,
                        stop_reason=completion.stop_reason if finished else None,
                    )
                    yield sse(CompletionResponse(id=response_id, created=created, model=model, choices=[choice]).model_dump_json())
        except Exception as exc:
            error = engine_error(exc)
            if error is None:
                raise
            yield sse(error.body.model_dump_json())
        if request.stream_options is not None and request.stream_options.include_usage:
            usage = self.usage([len(p.token_ids) for p in prompts], finals)
            yield sse(CompletionResponse(id=response_id, created=created, model=model, choices=[], usage=usage).model_dump_json())
        yield sse("[DONE]")

    @staticmethod
    def _logprobs(tokens: list[TokenLogprobs], offset: int) -> tuple[CompletionLogProbs, int]:
        """OpenAI's completion logprobs for `tokens`, whose text starts at `offset`; returns the next offset."""
        result = CompletionLogProbs()
        for token in tokens:
            result.tokens.append(token.token)
            result.token_logprobs.append(token.logprob)
            result.top_logprobs.append(dict(token.alternatives))
            result.text_offset.append(offset)
            offset += len(token.token)
        return result, offset
