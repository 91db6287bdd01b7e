"""What the completion and chat endpoints share: errors, sampling params, submitting choices.

A request with `n` choices (and, for completions, several prompts) becomes one
engine request per choice. The engine samples one sequence per request, so
`n > 1` is served as `n` independent requests whose seeds are derived from the
request's `seed` (`seed + i`), which keeps a seeded `n=2` request reproducible.
The outputs are merged into one stream of `(choice_index, RequestOutput)`. (The
copies share the prompt's KV blocks only through the prefix cache, when they are
prefilled in different steps; sharing them by copy-on-write needs the engine's
own n > 1 support.)
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from kvserve.engine.async_engine import AsyncLLMEngine, EngineOverloadedError, EngineStoppedError, RequestStream
from kvserve.entrypoints.openai.protocol import ErrorInfo, ErrorResponse, SamplingRequest, UsageInfo
from kvserve.outputs import RequestOutput
from kvserve.sampling_params import SamplingParams

MAX_N = 64
T = TypeVar("T")
_UINT63 = 2**63 - 1


class OpenAIError(Exception):
    """An error answered with an HTTP status and OpenAI's `{"error": {...}}` body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = ErrorResponse(error=ErrorInfo(message=message, type=type, param=param, code=code))


def bad_request(message: str, param: str | None = None, code: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, "invalid_request_error", param, code)


@dataclass
class TokenLogprobs:
    """One generated token: its text and logprob, and the alternatives (top-k and itself) by rank."""

    token: str
    logprob: float
    alternatives: list[tuple[str, float]]


@dataclass
class ChoiceRequest:
    """One engine request: the choice it fills, its prompt tokens and its sampling params."""

    index: int
    prompt_token_ids: list[int]
    params: SamplingParams


class Choices:
    """The engine requests of one API request, read as one merged stream."""

    def __init__(self, engine: AsyncLLMEngine, response_id: str, request_ids: list[str], streams: list[RequestStream], indices: list[int]) -> None:
        self.engine = engine
        self.response_id = response_id
        self.request_ids = request_ids
        self.streams = streams
        self.indices = indices
        self._finished: set[str] = set()

    async def __aiter__(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        queue: asyncio.Queue[tuple[int, RequestOutput | BaseException]] = asyncio.Queue()

        async def pump(index: int, stream: RequestStream) -> None:
            try:
                async for out in stream:
                    queue.put_nowait((index, out))
            except Exception as exc:
                queue.put_nowait((index, exc))

        tasks = [asyncio.create_task(pump(i, s)) for i, s in zip(self.indices, self.streams)]
        try:
            remaining = len(tasks)
            while remaining:
                index, item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item.finished:
                    remaining -= 1
                    self._finished.add(item.request_id)
                yield index, item
        finally:
            for task in tasks:
                task.cancel()

    async def final_outputs(self) -> dict[int, RequestOutput]:
        finals: dict[int, RequestOutput] = {}
        async for index, out in self:
            if out.finished:
                finals[index] = out
        return finals

    def abort(self) -> None:
        """Abort every request not yet finished (client gone, error, shutdown); frees their KV blocks."""
        for request_id in self.request_ids:
            if request_id not in self._finished:
                self.engine.abort(request_id)
                self._finished.add(request_id)


class OpenAIServing:
    """Base of the endpoint handlers: model check, sampling params, submission."""

    def __init__(self, engine: AsyncLLMEngine, served_model_name: str) -> None:
        self.engine = engine
        self.served_model_name = served_model_name

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.served_model_name:
            raise OpenAIError(404, f"The model `{model}` does not exist; this server serves `{self.served_model_name}`.",
                              "invalid_request_error", "model", "model_not_found")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Tokenize on the event loop: the tokenizer is only read, never reconfigured, so sharing it is safe."""
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens).input_ids)

    def token_logprobs(self, out: RequestOutput, new_only: bool) -> list[TokenLogprobs]:
        """Logprobs of the output's tokens (only those this step added when `new_only`), with token texts."""
        completion = out.outputs[0]
        ids = completion.token_ids
        start = len(ids) - len(out.new_token_ids[0]) if new_only else 0
        entries = (completion.logprobs or [])[start : len(ids)]  # by index: the engine thread only appends
        previous = ids[start - 1] if start > 0 else (out.prompt_token_ids[-1] if out.prompt_token_ids else None)
        result = []
        for token_id, entry in zip(ids[start:], entries):
            ranked = sorted(entry.items(), key=lambda item: item[1].rank if item[1].rank is not None else 1 << 30)
            chosen = entry.get(token_id)
            result.append(TokenLogprobs(
                self._token_text(token_id, previous), chosen.logprob if chosen is not None else float("nan"),
                [(self._token_text(t, previous), lp.logprob) for t, lp in ranked],
            ))
            previous = token_id
        return result

    def _token_text(self, token_id: int, previous_id: int | None) -> str:
        """A token's text as it reads after `previous_id`.

        Decoded alone, a SentencePiece token loses its word's leading space ("▁there" -> "there"),
        so the token is decoded after its predecessor and the predecessor's text is cut off.
        """
        def decode(ids: list[int]) -> str:
            return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

        if previous_id is not None:
            before = decode([previous_id])
            both = decode([previous_id, token_id])
            if not before.endswith("\ufffd") and both.startswith(before):
                return both[len(before) :]
        return decode([token_id])

    def check_common(self, request: SamplingRequest) -> None:
        if not 1 <= request.n <= MAX_N:
            raise bad_request(f"n must be an integer in [1, {MAX_N}], got {request.n}", "n")
        if request.logit_bias:
            raise bad_request("logit_bias is not supported", "logit_bias")

    def sampling_params(
        self,
        request: SamplingRequest,
        max_tokens: int | None,
        logprobs: int | None,
        seed: int | None,
        renamed: dict[str, str] | None = None,
    ) -> SamplingParams:
        """SamplingParams for one choice; its ValueError becomes a 400 naming the API parameter."""
        try:
            return SamplingParams(
                temperature=1.0 if request.temperature is None else request.temperature,
                top_p=1.0 if request.top_p is None else request.top_p,
                top_k=0 if request.top_k is None else request.top_k,
                min_p=0.0 if request.min_p is None else request.min_p,
                repetition_penalty=1.0 if request.repetition_penalty is None else request.repetition_penalty,
                presence_penalty=request.presence_penalty,
                frequency_penalty=request.frequency_penalty,
                seed=seed,
                max_tokens=max_tokens,
                min_tokens=request.min_tokens,
                stop=request.stop,
                stop_token_ids=request.stop_token_ids,
                ignore_eos=request.ignore_eos,
                include_stop_str_in_output=request.include_stop_str_in_output,
                skip_special_tokens=request.skip_special_tokens,
                logprobs=logprobs,
            )
        except ValueError as exc:
            name = str(exc).split(" ", 1)[0]
            param = (renamed or {}).get(name, name) if name in SamplingParams.__dataclass_fields__ else None
            raise bad_request(str(exc), param) from None

    def max_tokens_for(self, prompt_len: int, max_tokens: int | None, explicit: bool, param: str) -> int | None:
        """The completion budget: an explicit one must fit the context (400 if not), a default one is clamped."""
        room = self.engine.max_model_len - prompt_len
        if room < 1 or max_tokens is None or max_tokens < 1 or max_tokens <= room:
            return max_tokens  # the engine and SamplingParams reject the bad cases, naming the parameter
        if not explicit:
            return room
        raise bad_request(
            f"This model's maximum context length is {self.engine.max_model_len} tokens. However, you requested "
            f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} in the completion). "
            "Reduce the length of the prompt or the completion.",
            param,
            "context_length_exceeded",
        )

    @staticmethod
    def choice_seed(seed: int | None, choice: int) -> int | None:
        if seed is None or choice == 0:
            return seed
        return (seed + choice) & _UINT63

    async def submit(self, prefix: str, choices: list[ChoiceRequest], prompt_param: str) -> Choices:
        """Add every choice to the engine; all are accepted or none (the accepted ones are aborted)."""
        base = f"{prefix}-{uuid.uuid4().hex}"
        request_ids = [f"{base}-{c.index}" for c in choices]
        results = await asyncio.gather(
            *(self.engine.add_request(rid, c.prompt_token_ids, c.params) for rid, c in zip(request_ids, choices)),
            return_exceptions=True,
        )
        failure = next((r for r in results if isinstance(r, BaseException)), None)
        if failure is None:
            return Choices(self.engine, base, request_ids, list(results), [c.index for c in choices])
        for rid, result in zip(request_ids, results):
            if not isinstance(result, BaseException):
                self.engine.abort(rid)
        if isinstance(failure, EngineOverloadedError):
            raise OpenAIError(503, str(failure), "service_unavailable_error", None, "server_overloaded")
        if isinstance(failure, EngineStoppedError):
            raise OpenAIError(503, str(failure), "service_unavailable_error", None, "engine_unavailable")
        if isinstance(failure, ValueError):
            raise bad_request(str(failure), prompt_param)
        raise failure

    @staticmethod
    def usage(prompt_lens: list[int], finals: list[RequestOutput]) -> UsageInfo:
        prompt = sum(prompt_lens)
        completion = sum(len(out.outputs[0].token_ids) for out in finals)
        return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


async def run_until_disconnect(request: Request, work: Awaitable[T]) -> T | None:
    """Await `work` unless the client disconnects first (then cancel it and return None).

    Streaming responses notice a disconnect on their own; a non-streaming request
    would otherwise keep generating for nobody until max_tokens.
    """
    task = asyncio.ensure_future(work)
    waiter = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        return task.result() if task in done else None
    finally:
        waiter.cancel()
        task.cancel()


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


class SSEResponse(StreamingResponse):
    """A `text/event-stream` response that calls `on_close` however it ends (done, disconnect, error)."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def sse(data: str) -> str:
    return f"data: {data}\n\n"
