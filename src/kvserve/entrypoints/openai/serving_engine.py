"""What the completion and chat endpoints share: errors, limits, sampling params, submitting prompts.

Each prompt of a request becomes one engine request with the request's `n` (and
`best_of`): the engine prefills the prompt once and forks the outputs from it,
sharing its KV blocks copy-on-write; output i of a seeded request draws with
`seed + i` (`SamplingParams.seed_for_output`). Choice `p * n + i` of the API
response is output i of prompt p. Prompts x best_of is at most
`ServerLimits.max_fan_out`.

Rendering and tokenizing run off the event loop (`OffLoopRunner`), and a stream
whose client stops reading is cut off after `stream_stall_timeout_s`: the engine
side holds one merged output per request meanwhile (`RequestStream`).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Message, Receive, Scope, Send

from kvserve.engine.async_engine import AsyncLLMEngine, EngineOverloadedError, EngineStoppedError, RequestStream
from kvserve.engine.llm_engine import EngineDeadError
from kvserve.entrypoints.openai.off_loop import OffLoopRunner, PreprocessTimeout
from kvserve.entrypoints.openai.protocol import ErrorInfo, ErrorResponse, SamplingRequest, UsageInfo
from kvserve.outputs import RequestOutput
from kvserve.sampling_params import SamplingParams, StructuredOutputsParams
from kvserve.validation import brief, check, is_int, is_number

logger = logging.getLogger("kvserve.server")

MAX_N = 64
RETRY_AFTER_S = 1  # what a 503 for an overloaded server tells the client to wait
T = TypeVar("T")


class OpenAIError(Exception):
    """An error answered with an HTTP status and OpenAI's `{"error": {...}}` body."""

    def __init__(
        self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None, code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = ErrorResponse(error=ErrorInfo(message=message, type=type, param=param, code=code))
        self.headers = headers


def bad_request(message: str, param: str | None = None, code: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, "invalid_request_error", param, code)


def engine_error(exc: BaseException) -> OpenAIError | None:
    """The HTTP answer to an engine-side failure: 503 (overloaded, shutting down, or the engine died: another
    server may answer) or 500 (the engine failed this request); None for anything else."""
    if isinstance(exc, EngineOverloadedError):
        return OpenAIError(503, str(exc), "service_unavailable_error", None, "server_overloaded", {"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(exc, EngineDeadError):
        return OpenAIError(503, str(exc), "service_unavailable_error", None, "engine_dead")
    if isinstance(exc, EngineStoppedError):
        return OpenAIError(503, str(exc), "service_unavailable_error", None, "engine_unavailable")
    return None


def check_outputs(finals: dict[int, RequestOutput]) -> None:
    """A non-streaming response may only be 200 if every choice ended normally."""
    for out in finals.values():
        if out.error is not None:
            raise OpenAIError(500, out.error, "internal_server_error", None, "request_failed")
    if any(c.finish_reason == "abort" for out in finals.values() for c in out.outputs):
        raise OpenAIError(503, "the server is shutting down: the request was cut off before it finished; retry",
                          "service_unavailable_error", None, "engine_unavailable")


@dataclass
class ServerLimits:
    """What one request may cost the server (the `kvserve serve` flags of the same names)."""

    max_request_bytes: int = 8 << 20  # bigger bodies get 413 before they are read
    max_fan_out: int = 256  # prompts x n of one request
    preprocess_timeout_s: float = 30.0  # rendering the chat template and tokenizing one request
    stream_stall_timeout_s: float = 60.0  # a streaming client that reads nothing for this long is cut off
    trust_request_chat_template: bool = False

    def __post_init__(self) -> None:
        check(is_int(self.max_request_bytes) and self.max_request_bytes >= 1024, "max_request_bytes", self.max_request_bytes, "an integer >= 1024")
        check(is_int(self.max_fan_out) and self.max_fan_out >= 1, "max_fan_out", self.max_fan_out, "an integer >= 1")
        for name in ("preprocess_timeout_s", "stream_stall_timeout_s"):
            check(is_number(getattr(self, name)) and getattr(self, name) > 0, name, getattr(self, name), "a number > 0")


@dataclass
class TokenLogprobs:
    """One generated token: its text and logprob, and the alternatives (top-k and itself) by rank."""

    token: str
    logprob: float
    alternatives: list[tuple[str, float]]


@dataclass
class PromptRequest:
    """One engine request: its prompt's index, its tokens and its sampling params (with the request's n)."""

    index: int
    prompt_token_ids: list[int]
    params: SamplingParams


class Choices:
    """The engine requests of one API request (one per prompt), read as one merged stream of
    `(prompt index, RequestOutput)`."""

    def __init__(self, engine: AsyncLLMEngine, response_id: str, request_ids: list[str], streams: list[RequestStream], indices: list[int]) -> None:
        self.engine = engine
        self.response_id = response_id
        self.request_ids = request_ids
        self.streams = streams
        self.indices = indices
        self._finished: set[str] = set()

    async def __aiter__(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Outputs as they come. Nothing is taken ahead of the reader: what it has not read yet stays merged in
        its stream. One event, shared by the streams, wakes the reader."""
        ready = asyncio.Event()
        ready.set()  # take what arrived before
        for stream in self.streams:
            stream.ready = ready
        open_streams = list(zip(self.indices, self.streams))
        while open_streams:
            await ready.wait()
            ready.clear()
            for index, stream in list(open_streams):
                out = stream.take()
                if out is None:
                    continue
                if stream.done:
                    self._finished.add(out.request_id)
                    open_streams.remove((index, stream))
                yield index, out

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
    """Base of the endpoint handlers: model check, limits, sampling params, submission."""

    def __init__(self, engine: AsyncLLMEngine, served_model_names: list[str], limits: ServerLimits | None = None) -> None:
        self.engine = engine
        self.served_model_names = served_model_names
        self.served_model_name = served_model_names[0]  # the name responses carry, as in vLLM
        self.limits = limits or ServerLimits()
        self.off_loop = OffLoopRunner(self.limits.preprocess_timeout_s)

    @property
    def tokenizer(self) -> Any:
        """The engine's tokenizer; a 400 when `--skip-tokenizer-init` left it unloaded (text cannot be handled)."""
        if self.engine.tokenizer is None:
            raise bad_request("this server was started with --skip-tokenizer-init and has no tokenizer: give the "
                              "prompt as token ids to /v1/completions", "prompt")
        return self.engine.tokenizer

    def check_model(self, model: str | None) -> None:
        if model is not None and model not in self.served_model_names:
            served = "`, `".join(self.served_model_names)
            raise OpenAIError(404, f"The model {brief(model)} does not exist; this server serves `{served}`.",
                              "invalid_request_error", "model", "model_not_found")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Tokenize (call it through `preprocess`): the tokenizer is only read, never reconfigured, so threads may share it."""
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens).input_ids)

    async def preprocess(self, fn: Callable[[], T], param: str) -> T:
        """`fn()` (rendering, tokenizing) off the event loop within the time limit; 400 naming `param` past it."""
        try:
            return await self.off_loop.run(fn)
        except PreprocessTimeout as exc:
            raise bad_request(
                f"rendering and tokenizing the request {exc} (the server's --preprocess-timeout); send a shorter {param}",
                param, "preprocess_timeout",
            ) from None

    def check_fan_out(self, num_prompts: int, n: int, param: str = "n") -> None:
        """`n` is the generations per prompt (best_of where given); `param` names it."""
        if num_prompts * n > self.limits.max_fan_out:
            raise bad_request(
                f"{num_prompts} prompts x {param}={n} would be {num_prompts * n} generations; this server takes at most "
                f"{self.limits.max_fan_out} per request (--max-fan-out)", param if num_prompts == 1 else "prompt",
            )

    def token_logprobs(self, out: RequestOutput, output: int, new_only: bool) -> list[TokenLogprobs]:
        """Logprobs of output `output`'s tokens (only those this step added when `new_only`), with token texts."""
        completion = out.outputs[output]
        ids = completion.token_ids
        start = len(ids) - len(out.new_token_ids[output]) if new_only else 0
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
            raise bad_request(f"n must be an integer in [1, {MAX_N}], got {brief(request.n)}", "n")

    def requested_constraint(self, request: SamplingRequest) -> tuple[StructuredOutputsParams | None, str | None]:
        """The request's structured-output constraint and the field that gives it: `response_format` (json_object,
        json_schema), vLLM's `structured_outputs` object or one of its `guided_*` fields; a 400 naming the field
        when it is malformed, or when two fields give one."""
        given: list[tuple[str, dict[str, Any]]] = []
        response_format = request.response_format
        if response_format is not None and response_format.type == "json_object":
            given.append(("response_format", {"json_object": True}))
        elif response_format is not None and response_format.type == "json_schema":
            spec = response_format.json_schema
            if spec is None or spec.schema_ is None:
                raise bad_request('response_format of type "json_schema" needs json_schema.schema', "response_format")
            given.append(("response_format", {"json": spec.schema_}))
        if request.structured_outputs is not None:
            given.append(("structured_outputs", request.structured_outputs.model_dump(by_alias=True, exclude_unset=True)))
        for name, key in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"), ("guided_grammar", "grammar")):
            if getattr(request, name) is not None:
                given.append((name, {key: getattr(request, name)}))
        if len(given) > 1:
            raise bad_request(f"{given[1][0]} and {given[0][0]} both constrain the output: give one of them", given[1][0])
        if not given:
            return None, None
        param, fields = given[0]
        try:
            return StructuredOutputsParams(**fields), param
        except ValueError as exc:
            raise bad_request(_renamed(str(exc), param), param) from None

    async def compile_constraint(self, constraint: StructuredOutputsParams | None, param: str | None) -> None:
        """Compile `constraint` off the event loop, so that one that does not compile is a 400 naming `param` before
        anything is queued (the engine then finds it in the compiler's cache)."""
        if constraint is None:
            return
        compiler = self.engine.grammar_compiler
        try:
            await self.preprocess(lambda: compiler.compile(constraint), param or "structured_outputs")
        except ValueError as exc:
            raise bad_request(_renamed(str(exc), param), param) from None

    def sampling_params(
        self,
        request: SamplingRequest,
        max_tokens: int | None,
        logprobs: int | None,
        best_of: int | None = None,
        renamed: dict[str, str] | None = None,
        constraint: StructuredOutputsParams | None = None,
    ) -> SamplingParams:
        """SamplingParams for each prompt; its ValueError becomes a 400 naming the API parameter (`renamed` maps
        SamplingParams names to the request's, in the parameter and in the message)."""
        defaults = self.engine.sampling_defaults  # --generation-config: the model's, where the request sets none

        def pick(value: Any, name: str, fallback: Any) -> Any:
            return value if value is not None else defaults.get(name, fallback)

        try:
            return SamplingParams(
                n=request.n,
                best_of=best_of,
                temperature=pick(request.temperature, "temperature", 1.0),
                top_p=pick(request.top_p, "top_p", 1.0),
                top_k=pick(request.top_k, "top_k", 0),
                min_p=pick(request.min_p, "min_p", 0.0),
                repetition_penalty=pick(request.repetition_penalty, "repetition_penalty", 1.0),
                presence_penalty=request.presence_penalty,
                frequency_penalty=request.frequency_penalty,
                seed=request.seed,
                max_tokens=max_tokens,
                min_tokens=request.min_tokens,
                stop=request.stop,
                stop_token_ids=request.stop_token_ids,
                ignore_eos=request.ignore_eos,
                include_stop_str_in_output=request.include_stop_str_in_output,
                skip_special_tokens=request.skip_special_tokens,
                logprobs=logprobs,
                logit_bias=request.logit_bias,
                allowed_token_ids=request.allowed_token_ids,
                bad_words=request.bad_words,
                structured_outputs=constraint,
            )
        except ValueError as exc:
            raise _named_bad_request(exc, None, renamed) from None

    def max_tokens_for(self, prompt_len: int, max_tokens: int | None, explicit: bool, param: str) -> int | None:
        """The completion budget: an explicit one must fit the context (400 if not) unless the engine streams
        (--sliding-window: a request may grow past max_model_len), a default one is clamped, also to the model's
        max_new_tokens (--generation-config), as in vLLM."""
        model_default = self.engine.sampling_defaults.get("max_tokens")
        if not explicit and model_default is not None:
            max_tokens = model_default if max_tokens is None else min(max_tokens, model_default)
        room = self.engine.max_model_len - prompt_len
        if room < 1 or max_tokens is None or max_tokens < 1 or max_tokens <= room or (explicit and self.engine.streaming):
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

    async def submit(self, prefix: str, prompts: list[PromptRequest], prompt_param: str, renamed: dict[str, str] | None = None) -> Choices:
        """Add every prompt's request to the engine; all are accepted or none (the accepted ones are aborted)."""
        base = f"{prefix}-{uuid.uuid4().hex}"
        request_ids = [f"{base}-{p.index}" for p in prompts]
        results = await asyncio.gather(
            *(self.engine.add_request(rid, p.prompt_token_ids, p.params) for rid, p in zip(request_ids, prompts)),
            return_exceptions=True,
        )
        failure = next((r for r in results if isinstance(r, BaseException)), None)
        if failure is None:
            return Choices(self.engine, base, request_ids, list(results), [p.index for p in prompts])
        for rid, result in zip(request_ids, results):
            if not isinstance(result, BaseException):
                self.engine.abort(rid)
        error = engine_error(failure)
        if error is not None:
            raise error
        if isinstance(failure, ValueError):
            raise _named_bad_request(failure, prompt_param, renamed)
        raise failure

    @staticmethod
    def usage(prompt_lens: list[int], finals: list[RequestOutput]) -> UsageInfo:
        """Each prompt counted once (its n outputs share it), every returned output's tokens."""
        prompt = sum(prompt_lens)
        completion = sum(len(c.token_ids) for out in finals for c in out.outputs)
        return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _renamed(message: str, param: str | None) -> str:
    """A structured-output error message under the request's own name for the field (`response_format`, `tools`, ...)."""
    prefix = "structured_outputs"
    return f"{param}{message[len(prefix):]}" if param and message.startswith(prefix) else message


def _named_bad_request(exc: ValueError, default_param: str | None, renamed: dict[str, str] | None) -> OpenAIError:
    """A 400 for a SamplingParams or engine ValueError, whose message starts with the parameter it names
    (under the request's own name for it, per `renamed`); other messages name `default_param`."""
    name, _, rest = str(exc).partition(" ")
    if name not in SamplingParams.__dataclass_fields__:
        return bad_request(str(exc), default_param)
    param = (renamed or {}).get(name, name)
    return bad_request(f"{param} {rest}", param)


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
    """A `text/event-stream` response that calls `on_close` however it ends (done, disconnect, error, stall).

    A client that stops reading fills the socket buffers, and then every write
    waits. After `stall_timeout_s` of one write waiting, the response gives up:
    the connection is closed and `on_close` aborts the request, freeing its blocks.
    """

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None], stall_timeout_s: float) -> None:
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._on_close = on_close
        self._stall_timeout_s = stall_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_or_give_up(message: Message) -> None:
            try:
                async with asyncio.timeout(self._stall_timeout_s):
                    await send(message)
            except TimeoutError:
                raise ClientStalled(f"the client read nothing for {self._stall_timeout_s:g} s; its request was aborted") from None

        try:
            await super().__call__(scope, receive, send_or_give_up)
        except ClientStalled as exc:
            logger.warning("%s %s: %s", scope.get("method"), scope.get("path"), exc)
        finally:
            self._on_close()


class ClientStalled(Exception):
    """A streaming client stopped reading for longer than the stall timeout."""


def sse(data: str) -> str:
    return f"data: {data}\n\n"
