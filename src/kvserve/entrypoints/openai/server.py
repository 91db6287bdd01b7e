"""The OpenAI-compatible HTTP server: FastAPI app, error mapping, uvicorn with graceful shutdown.

`build_app()` wires an `AsyncLLMEngine` (one background thread stepping the
engine) to the endpoints. Every error leaves as OpenAI's
`{"error": {"message", "type", "param", "code"}}`: 400 for invalid values, 404 for
an unknown model, 422 for a body that is not JSON, 503 when overloaded or
shutting down; a 500 only for a bug.

On SIGTERM / Ctrl-C uvicorn stops accepting connections and waits for open ones;
`GracefulServer` additionally ends every in-flight stream at once (a final chunk
with finish_reason "abort", then `[DONE]`), so the process exits within seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import FrameType
from typing import Any, Callable

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from kvserve.config import EngineConfig, model_context_length
from kvserve.engine.async_engine import AsyncLLMEngine, EngineStoppedError
from kvserve.engine.llm_engine import LLMEngine
from kvserve.entrypoints.cli import add_engine_arguments, engine_config_from_args
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
from kvserve.entrypoints.openai.serving_engine import OpenAIError, bad_request
from kvserve.metrics import ServerMetrics

logger = logging.getLogger("kvserve.server")

_GRACEFUL_SHUTDOWN_S = 5


def build_app(
    engine_or_config: EngineConfig | LLMEngine | AsyncLLMEngine,
    served_model_name: str | None = None,
    max_waiting_requests: int | None = None,
) -> FastAPI:
    """The FastAPI app serving one model. Its engine thread starts and stops with the app's lifespan."""
    if isinstance(engine_or_config, AsyncLLMEngine):
        async_engine = engine_or_config
    else:
        engine = engine_or_config if isinstance(engine_or_config, LLMEngine) else LLMEngine(engine_or_config)
        async_engine = AsyncLLMEngine(engine, max_waiting_requests)
    engine = async_engine.engine
    name = served_model_name or engine.config.model or os.path.basename(os.path.normpath(engine.model_path))
    metrics = ServerMetrics(name)
    async_engine.stats_listener = metrics.observe
    log_capacity(engine, name)

    completion = OpenAIServingCompletion(async_engine, name)
    chat = OpenAIServingChat(async_engine, name)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async_engine.start()
        yield
        await async_engine.shutdown()

    app = FastAPI(title="kvserve", lifespan=lifespan)
    app.state.engine = async_engine
    app.state.metrics = metrics
    app.state.served_model_name = name
    _add_error_handlers(app)

    @app.get("/health")
    async def health() -> Response:
        if not async_engine.is_running:
            raise OpenAIError(503, "the engine is not running", "service_unavailable_error")
        return Response(status_code=200)

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=name, root=engine.model_path, max_model_len=async_engine.max_model_len)])

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
            tokens = chat.render(request.messages, request.add_generation_prompt)
        else:
            tokens = completion.encode(request.prompt or "", request.add_special_tokens)
        return TokenizeResponse(count=len(tokens), max_model_len=async_engine.max_model_len, tokens=tokens)

    @app.post("/detokenize")
    async def detokenize(request: DetokenizeRequest) -> DetokenizeResponse:
        completion.check_model(request.model)
        vocab = len(async_engine.tokenizer)
        bad = [t for t in request.tokens if not 0 <= t < vocab]
        if bad:
            raise bad_request(f"tokens must be integers in [0, {vocab - 1}], got {bad[:5]}", "tokens")
        return DetokenizeResponse(prompt=async_engine.tokenizer.decode(request.tokens))

    return app


def log_capacity(engine: LLMEngine, name: str) -> None:
    """Say how many tokens the KV cache holds next to the context length: the concurrency the server can carry."""
    config = engine.config
    capacity = engine.block_manager.num_blocks * config.block_size
    context = model_context_length(engine.hf_config)
    logger.info(
        "serving %s: KV cache capacity %d tokens (%d blocks x %d); model context length %d tokens, max_model_len %d "
        "-> %.1f full-length sequences fit at once",
        name, capacity, engine.block_manager.num_blocks, config.block_size, context, config.max_model_len,
        capacity / max(1, config.max_model_len),
    )


# ---- errors -----------------------------------------------------------------------


def _error_response(error: OpenAIError) -> JSONResponse:
    return JSONResponse(error.body.model_dump(), status_code=error.status)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def on_openai_error(request: Request, exc: OpenAIError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(EngineStoppedError)
    async def on_engine_stopped(request: Request, exc: EngineStoppedError) -> JSONResponse:
        return _error_response(OpenAIError(503, str(exc), "service_unavailable_error", None, "engine_unavailable"))

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
        return _error_response(OpenAIError(500, f"internal server error: {exc!r}", "internal_server_error"))


def _validation_error(exc: RequestValidationError) -> OpenAIError:
    """A body that is not a JSON object -> 422; a field of the wrong type or shape -> 400 naming it."""
    errors = exc.errors()
    first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request", "type": "unknown"}
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    if not loc or first.get("type") == "json_invalid":
        detail = first.get("msg", "invalid JSON")
        ctx = first.get("ctx") or {}
        if ctx.get("error"):
            detail = f"{detail}: {ctx['error']}"
        return OpenAIError(422, f"could not parse the request body as a JSON object ({detail})", "invalid_request_error", None, "invalid_json")
    param = loc[0]
    path = ".".join(loc)
    received = first.get("input")
    return bad_request(f"{path}: {first.get('msg', 'invalid value')}, got {received!r}", param)


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
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served-model-name", default=None, help="the model name clients send (default: the --model value)")
    parser.add_argument("--max-waiting-requests", type=int, default=None,
                        help="answer 503 when this many requests already wait for a batch slot (default: no limit)")
    add_engine_arguments(parser)


def run_serve(args: argparse.Namespace) -> int:
    if args.max_waiting_requests is not None and args.max_waiting_requests < 1:
        raise ValueError(f"--max-waiting-requests must be >= 1, got {args.max_waiting_requests}")
    level = getattr(args, "log_level", "WARNING")
    if level == "WARNING":  # the default: a server should still say where it listens and what it holds
        level = "INFO"
    logging.getLogger("kvserve").setLevel(level)
    app = build_app(engine_config_from_args(args), args.served_model_name, args.max_waiting_requests)
    config = uvicorn.Config(
        app, host=args.host, port=args.port, log_level=level.lower(), access_log=level == "DEBUG",
        timeout_graceful_shutdown=_GRACEFUL_SHUTDOWN_S,
    )
    logger.info("listening on http://%s:%d (OpenAI API under /v1)", args.host, args.port)
    GracefulServer(config, on_exit=app.state.engine.begin_shutdown).run()
    return 0
