"""The OpenAI-compatible HTTP server: FastAPI app, error mapping, uvicorn with graceful shutdown.

`build_app()` wires an `AsyncLLMEngine` (one background thread stepping the
engine) to the endpoints. Every error leaves as OpenAI's
`{"error": {"message", "type", "param", "code"}}`: 400 for invalid values and
unknown fields, 401 without the API key, 404 for an unknown model, 413 for a
body over `--max-request-bytes` (refused before it is parsed), 422 for a body
that is not JSON, 503 (with `Retry-After`) when overloaded or shutting down; a
500 only for a bug, or for a request the engine failed alone.

On SIGTERM / Ctrl-C uvicorn stops accepting connections and waits for open ones;
`GracefulServer` additionally ends every in-flight stream at once (a final chunk
with finish_reason "abort", then `[DONE]`), so the process exits within seconds.
If the engine itself dies (a fault no single request explains), every in-flight
request fails with a 500 or an error event and `kvserve serve` exits with
status 1, so that a supervisor restarts it: never a live process with a dead
engine.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import logging
import os
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from types import FrameType
from typing import Any, Callable

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kvserve.config import EngineConfig, model_context_length
from kvserve.engine.async_engine import AsyncLLMEngine, EngineStoppedError
from kvserve.engine.data_parallel_engine import DataParallelEngine, make_engine
from kvserve.engine.llm_engine import EngineDeadError, LLMEngine
from kvserve.engine_args import add_engine_arguments, engine_config_from_args
from kvserve.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from kvserve.entrypoints.openai.serving_chat import OpenAIServingChat
from kvserve.entrypoints.openai.serving_completion import OpenAIServingCompletion
from kvserve.entrypoints.openai.serving_engine import OpenAIError, ServerLimits, bad_request, engine_error
from kvserve.entrypoints.openai.tool_parsers import TOOL_PARSERS
from kvserve.entrypoints.openai.web_ui import is_public, mount_web_ui
from kvserve.metrics import ServerMetrics
from kvserve.stat_logger import StatLogger
from kvserve.validation import brief

logger = logging.getLogger("kvserve.server")

_GRACEFUL_SHUTDOWN_S = 5
DEFAULT_MAX_WAITING_REQUESTS = 1024


def build_app(
    engine_or_config: EngineConfig | LLMEngine | DataParallelEngine | AsyncLLMEngine,
    served_model_name: str | list[str] | None = None,
    max_waiting_requests: int | None = DEFAULT_MAX_WAITING_REQUESTS,
    limits: ServerLimits | None = None,
    api_key: str | None = None,
    allowed_origins: list[str] | None = None,
    tool_call_parser: str | None = None,
    enable_auto_tool_choice: bool = False,
    log_requests: bool = True,
    log_stats: bool = True,
    response_role: str = "assistant",
) -> FastAPI:
    """The FastAPI app serving one model. Its engine thread starts and stops with the app's lifespan.

    `served_model_name`: the name, or names, requests may send (vLLM's): /v1/models lists them all,
    responses carry the first. `api_key` guards every path but /health and the web pages' files (web_ui.py);
    `allowed_origins` turns CORS on (off by default). `tool_call_parser` (hermes) reads tool calls out of chat
    outputs; `enable_auto_tool_choice` lets a request leave the call to the model (tool_choice "auto").
    `log_requests`: an INFO line per finished request; `log_stats`: an INFO line of throughput, queues and KV
    use every 10 s while busy (kvserve/stat_logger.py). `response_role`: the role of chat replies (vLLM's
    --response-role).
    """
    limits = limits or ServerLimits()
    if isinstance(engine_or_config, AsyncLLMEngine):
        async_engine = engine_or_config
    else:
        engine = make_engine(engine_or_config) if isinstance(engine_or_config, EngineConfig) else engine_or_config
        async_engine = AsyncLLMEngine(engine, max_waiting_requests)
    engine = async_engine.engine
    names = ([served_model_name] if isinstance(served_model_name, str) else list(served_model_name or [])) or \
        [default_served_model_name(engine.config.model, engine.model_path)]
    name = names[0]
    metrics = ServerMetrics(name)
    async_engine.stats_listeners += [metrics.observe, StatLogger(log_requests, log_stats).observe]
    log_capacity(engine, name)

    completion = OpenAIServingCompletion(async_engine, names, limits)
    chat = OpenAIServingChat(async_engine, names, limits, response_role, tool_call_parser=tool_call_parser,
                             enable_auto_tool_choice=enable_auto_tool_choice)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async_engine.start()
        yield
        await async_engine.shutdown()

    app = FastAPI(title="kvserve", lifespan=lifespan)
    app.router.route_class = LenientJSONRoute
    app.state.engine = async_engine
    app.state.metrics = metrics
    app.state.served_model_name = name
    _add_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=limits.max_request_bytes)
    if api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=api_key)
    if allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=allowed_origins, allow_methods=["*"], allow_headers=["*"])

    @app.get("/health")
    async def health() -> Response:
        if not async_engine.is_running:
            raise OpenAIError(503, "the engine is not running", "service_unavailable_error")
        return Response(status_code=200)

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=alias, root=name, max_model_len=async_engine.max_model_len) for alias in names])

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.post("/v1/completions")
    async def create_completion(request: CompletionRequest, raw_request: Request) -> Any:
        return await completion.create(request, raw_request)

    @app.post("/v1/chat/completions")
    async def create_chat_completion(request: ChatCompletionRequest, raw_request: Request) -> Any:
        return await chat.create(request, raw_request)

    @app.post("/tokenize")
    async def tokenize(request: TokenizeRequest) -> TokenizeResponse:
        completion.check_model(request.model)
        if (request.prompt is None) == (request.messages is None):
            raise bad_request("give exactly one of prompt or messages", "prompt")
        if request.messages is not None:
            messages = request.messages
            tokens = await chat.preprocess(lambda: chat.render(messages, request.add_generation_prompt), "messages")
        else:
            prompt = request.prompt or ""
            tokens = await completion.preprocess(lambda: completion.encode(prompt, request.add_special_tokens), "prompt")
        return TokenizeResponse(count=len(tokens), max_model_len=async_engine.max_model_len, tokens=tokens)

    @app.post("/detokenize")
    async def detokenize(request: DetokenizeRequest) -> DetokenizeResponse:
        completion.check_model(request.model)
        vocab = len(completion.tokenizer)
        bad = [t for t in request.tokens if not 0 <= t < vocab]
        if bad:
            raise bad_request(f"tokens must be integers in [0, {vocab - 1}], got {brief(bad[:5])}", "tokens")
        text = await completion.preprocess(lambda: completion.tokenizer.decode(request.tokens), "tokens")
        return DetokenizeResponse(prompt=text)

    for path, api in _NOT_SERVED.items():
        app.add_api_route(path, _not_served(path, api), methods=["POST"], include_in_schema=False)
    mount_web_ui(app, async_engine, name)
    return app


# OpenAI endpoints clients try that kvserve does not serve: a clear 501 in OpenAI's shape, not a bare 404
_NOT_SERVED = {
    "/v1/embeddings": "embeddings (kvserve runs generative models only)",
    "/v1/responses": "the Responses API (use /v1/chat/completions)",
}


def _not_served(path: str, api: str) -> Callable[[], Coroutine[Any, Any, Response]]:
    async def not_served() -> Response:
        raise OpenAIError(501, f"kvserve does not serve {path}: {api}. It serves /v1/completions, "
                               "/v1/chat/completions, /v1/models, /tokenize and /detokenize.",
                          "invalid_request_error", None, "unsupported_endpoint")
    return not_served


def default_served_model_name(model: str | None, model_path: str) -> str:
    """The name clients send: a hub id as given, else the model's directory or file name (never a local path)."""
    if model and not os.path.exists(model):
        return model
    return os.path.basename(os.path.normpath(model or model_path))


class LenientJSONRoute(APIRoute):
    """Reads JSON bodies with their undecodable bytes kept (as lone surrogates, `surrogateescape`), so that the
    schema's text check names the field holding them (a 400), where a strict decode fails the whole body."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def lenient(request: Request) -> Response:
            return await handler(_LenientRequest(request.scope, request.receive))

        return lenient


class _LenientRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = json.loads((await self.body()).decode("utf-8", "surrogateescape"))
        return self._json


class BodyLimitMiddleware:
    """413 for a request body over `max_bytes`: by its Content-Length before any of it is read, or, for a
    chunked body, as soon as what has arrived passes the limit (raised as an HTTPException from `receive`,
    which FastAPI passes on to the error handlers, so the answer has OpenAI's shape)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.max_bytes:
            await _error_response(self._too_large())(scope, receive, send)
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise StarletteHTTPException(413, self._too_large().body.error.message)
            return message

        await self.app(scope, limited, send)

    def _too_large(self) -> OpenAIError:
        return OpenAIError(413, f"the request body is larger than {self.max_bytes} bytes (the server's --max-request-bytes)",
                           "invalid_request_error", None, "request_too_large")


class ApiKeyMiddleware:
    """`Authorization: Bearer <key>` on every path but /health and the web pages' files (web_ui.py), compared in
    constant time; 401 in OpenAI's shape.

    CORS preflights (OPTIONS) carry no credentials by design and pass to the CORS middleware, which sits outside.
    """

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self._key = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in _OPEN_PATHS or is_public(scope["path"]) or scope["method"] == "OPTIONS":
            await self.app(scope, receive, send)
            return
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        if not (hmac.compare_digest(token.strip(), self._key) and scheme.lower() == b"bearer"):
            error = OpenAIError(401, "missing or incorrect API key: send the header `Authorization: Bearer <key>`",
                                "invalid_request_error", None, "invalid_api_key")
            await _error_response(error)(scope, receive, send)
            return
        await self.app(scope, receive, send)


_OPEN_PATHS = frozenset({"/health"})


def log_capacity(engine: LLMEngine | DataParallelEngine, name: str) -> None:
    """Say how many tokens the KV cache holds next to the context length: the concurrency the server can carry."""
    config = engine.config
    num_blocks = engine.stats().num_blocks
    capacity = num_blocks * config.block_size
    context = model_context_length(engine.hf_config)
    logger.info(
        "serving %s: KV cache capacity %d tokens (%d blocks x %d); model context length %d tokens, max_model_len %d "
        "-> %.1f full-length sequences fit at once",
        name, capacity, num_blocks, config.block_size, context, config.max_model_len,
        capacity / max(1, config.max_model_len),
    )


# ---- errors -----------------------------------------------------------------------


def _error_response(error: OpenAIError) -> JSONResponse:
    return JSONResponse(error.body.model_dump(), status_code=error.status, headers=error.headers)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def on_openai_error(request: Request, exc: OpenAIError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(EngineStoppedError)
    @app.exception_handler(EngineDeadError)
    async def on_engine_failure(request: Request, exc: Exception) -> JSONResponse:
        error = engine_error(exc)
        assert error is not None
        return _error_response(error)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error_response(_validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error_response(OpenAIError(exc.status_code, str(exc.detail), kind))

    @app.exception_handler(Exception)
    async def on_internal_error(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("internal error while serving %s", request.url.path)
        return _error_response(OpenAIError(500, f"internal server error: {brief(exc)}", "internal_server_error"))


def _validation_error(exc: RequestValidationError) -> OpenAIError:
    """A body that is not a JSON object -> 422; a field of the wrong type or shape, or unknown -> 400 naming it."""
    errors = exc.errors()
    # a union field fails once per member: the member whose own check failed (a value_error) says most
    first = next((e for e in errors if e.get("type") == "value_error"), errors[0] if errors else
                 {"loc": ("body",), "msg": "invalid request", "type": "unknown"})
    # keep field names and indices, drop pydantic's union member tags ("list[int]", "function-after[...]")
    loc = [str(part) for part in first.get("loc", ()) if part != "body" and (isinstance(part, int) or str(part).isidentifier())]
    if not loc or first.get("type") == "json_invalid":
        detail = first.get("msg", "invalid JSON")
        ctx = first.get("ctx") or {}
        if ctx.get("error"):
            detail = f"{detail}: {ctx['error']}"
        return OpenAIError(422, f"could not parse the request body as a JSON object ({detail})", "invalid_request_error", None, "invalid_json")
    param = loc[0]
    path = ".".join(loc)
    if first.get("type") == "extra_forbidden":
        return bad_request(f"{path} is not a parameter this server knows; remove it (nothing is ignored silently)", param, "unknown_parameter")
    return bad_request(f"{path}: {first.get('msg', 'invalid value')}, got {brief(first.get('input'))}", param)


# ---- running it -------------------------------------------------------------------


class GracefulServer(uvicorn.Server):
    """uvicorn.Server that also ends in-flight streams when a shutdown signal arrives."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_exit = on_exit
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._on_exit)  # signal-safe: only wakes the loop


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = ServerLimits()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                        help="the model, as in `vllm serve MODEL` (the same as --model)")
    parser.add_argument("--served-model-name", nargs="+", default=None,
                        help="the model name(s) clients may send; responses carry the first (default: the model's "
                             "directory or file name, or the hub id)")
    parser.add_argument("--uvicorn-log-level", default=None, choices=["critical", "error", "warning", "info", "debug", "trace"],
                        help="uvicorn's own log level (default: kvserve's --log-level, at least info)")
    parser.add_argument("--disable-log-requests", action="store_true",
                        help="no log line per finished request (id, tokens, TTFT, duration, finish reason), and no "
                             "access log line at --log-level DEBUG")
    parser.add_argument("--response-role", default="assistant",
                        help="the role of the chat replies (with add_generation_prompt, the default; default: assistant)")
    parser.add_argument("--disable-log-stats", action="store_true",
                        help="no periodic stats line (throughput, running/waiting, KV use, prefix hit rate) while busy")
    g = parser.add_argument_group("security and limits")
    g.add_argument("--api-key", default=os.environ.get("KVSERVE_API_KEY"),
                   help="require `Authorization: Bearer <key>` on every endpoint but /health and the web pages' files (default: $KVSERVE_API_KEY; none)")
    g.add_argument("--allowed-origins", nargs="+", default=None,
                   help='origins allowed by CORS, e.g. http://localhost:3000 or \'["*"]\' (default: CORS off)')
    g.add_argument("--max-request-bytes", type=int, default=defaults.max_request_bytes,
                   help="larger request bodies get 413 before they are read (default: %(default)s)")
    g.add_argument("--max-waiting-requests", type=int, default=DEFAULT_MAX_WAITING_REQUESTS,
                   help="answer 503 with Retry-After when this many requests already wait for a batch slot (default: %(default)s)")
    g.add_argument("--max-fan-out", type=int, default=defaults.max_fan_out,
                   help="most generations (prompts x n) one request may start (default: %(default)s)")
    g.add_argument("--preprocess-timeout", type=float, default=defaults.preprocess_timeout_s,
                   help="seconds to render the chat template and tokenize one request, off the event loop (default: %(default)s)")
    g.add_argument("--stream-stall-timeout", type=float, default=defaults.stream_stall_timeout_s,
                   help="abort a streamed request whose client reads nothing for this many seconds (default: %(default)s)")
    g.add_argument("--trust-request-chat-template", action="store_true",
                   help="let requests send their own chat template (it runs as code on the server; refused by default)")
    t = parser.add_argument_group("tool calling")
    t.add_argument("--tool-call-parser", default=None, choices=sorted(TOOL_PARSERS),
                   help="the syntax of the model's tool calls, read into message.tool_calls (hermes: <tool_call>{json}</tool_call>)")
    t.add_argument("--enable-auto-tool-choice", action="store_true",
                   help='let requests leave the call to the model (tool_choice "auto"); needs --tool-call-parser')
    add_engine_arguments(parser, seed_alias=True, chat=True)


def _origins(values: list[str] | None) -> list[str] | None:
    """`--allowed-origins a b` or vLLM's JSON form `--allowed-origins '["a", "b"]'`."""
    if not values:
        return None
    if len(values) == 1 and values[0].lstrip().startswith("["):
        return [str(v) for v in json.loads(values[0])]
    return values


def run_serve(args: argparse.Namespace) -> int:
    """Serve until SIGTERM / Ctrl-C (exit status 0) or until the engine dies (exit status 1)."""
    if args.model_tag is not None:
        if args.model is not None and args.model != args.model_tag:
            raise ValueError(f"the model is given twice, as {args.model_tag!r} and as --model {args.model!r}; give one")
        args.model = args.model_tag
    if args.max_waiting_requests < 1:
        raise ValueError(f"--max-waiting-requests must be >= 1, got {args.max_waiting_requests}")
    limits = ServerLimits(
        max_fan_out=args.max_fan_out, preprocess_timeout_s=args.preprocess_timeout, stream_stall_timeout_s=args.stream_stall_timeout,
        trust_request_chat_template=args.trust_request_chat_template, max_request_bytes=args.max_request_bytes,
    )
    level = getattr(args, "log_level", "WARNING")
    if level == "WARNING":  # the default: a server should still say where it listens and what it holds
        level = "INFO"
    logging.getLogger("kvserve").setLevel(level)
    if args.enable_auto_tool_choice and args.tool_call_parser is None:
        raise ValueError("--enable-auto-tool-choice needs --tool-call-parser (the syntax of the model's tool calls)")
    app = build_app(engine_config_from_args(args), args.served_model_name, args.max_waiting_requests, limits, args.api_key,
                    _origins(args.allowed_origins), args.tool_call_parser, args.enable_auto_tool_choice,
                    not args.disable_log_requests, not args.disable_log_stats, args.response_role)
    config = uvicorn.Config(
        app, host=args.host, port=args.port, log_level=args.uvicorn_log_level or level.lower(),
        access_log=level == "DEBUG" and not args.disable_log_requests,
        timeout_graceful_shutdown=_GRACEFUL_SHUTDOWN_S,
    )
    engine: AsyncLLMEngine = app.state.engine
    server = GracefulServer(config, on_exit=engine.begin_shutdown)

    def on_engine_dead() -> None:
        logger.critical("the engine died; failing in-flight requests and exiting with status 1 for a supervisor to restart")
        server.should_exit = True

    engine.on_dead = on_engine_dead
    logger.info("listening on http://%s:%d (OpenAI API under /v1%s)", args.host, args.port, "; API key required" if args.api_key else "")
    server.run()
    return 1 if engine.dead_error is not None else 0
