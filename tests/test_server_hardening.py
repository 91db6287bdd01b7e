"""The server as a hostile or careless client meets it: API key, CORS, body and fan-out limits, text that is not
Unicode, NaN, unknown fields, request chat templates, slow tokenization, shutdown and stalled readers.

Real uvicorn servers on 127.0.0.1 (in threads), driven by httpx and the official openai client; every request
has a timeout and every loop a bound. The fuzz sweep and the dying engine run `kvserve serve` in a subprocess
(test_server_fuzz.py).
"""

from __future__ import annotations

import asyncio
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from kvserve.config import EngineConfig
from kvserve.entrypoints.cli import build_parser
from kvserve.entrypoints.openai.serving_engine import ServerLimits
from kvserve.layers.sampler import Sampler
from server_utils import KV_BYTES, TIMEOUT, ServerThread, assert_error, json_bytes, raw_post

PROMPT_TEXT = "Once upon a time"
KEY = "sk-test-key"
ORIGIN = "http://app.example"
CHAT = [{"role": "user", "content": "Tell me a story."}]
RUNAWAY_TEMPLATE = "{% for i in range(1000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}x"


def _config(model_dir: Path, **kwargs) -> EngineConfig:
    return EngineConfig(model=str(model_dir), dtype="float32", kv_cache_memory_bytes=KV_BYTES, max_num_seqs=64, **kwargs)


@pytest.fixture(scope="module")
def guarded(chat_model_dir: Path) -> Iterator[ServerThread]:
    """API key, CORS for one origin, a 64 KiB body limit, at most 8 generations per request."""
    limits = ServerLimits(max_request_bytes=64 << 10, max_fan_out=8)
    handle = ServerThread(_config(chat_model_dir), "stories", api_key=KEY, allowed_origins=[ORIGIN], limits=limits)
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def trusting(chat_model_dir: Path) -> Iterator[ServerThread]:
    """Default limits, except that request chat templates are allowed and preprocessing gets 2 s."""
    limits = ServerLimits(trust_request_chat_template=True, preprocess_timeout_s=2.0)
    handle = ServerThread(_config(chat_model_dir), "stories", limits=limits)
    yield handle
    handle.stop()


def _auth(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# ---- API key and CORS -----------------------------------------------------------------

ENDPOINTS = [
    ("GET", "/v1/models", None),
    ("POST", "/v1/completions", {"prompt": "Once", "max_tokens": 2}),
    ("POST", "/v1/chat/completions", {"messages": CHAT, "max_tokens": 2}),
    ("POST", "/tokenize", {"prompt": "Once"}),
    ("POST", "/detokenize", {"tokens": [5, 6]}),
    ("GET", "/metrics", None),
    ("GET", "/openapi.json", None),
]


@pytest.mark.parametrize("method, path, body", ENDPOINTS, ids=[e[1] for e in ENDPOINTS])
def test_every_endpoint_but_health_needs_the_api_key(guarded: ServerThread, method: str, path: str, body: dict | None) -> None:
    def call(headers: dict[str, str]) -> httpx.Response:
        return httpx.request(method, guarded.url + path, json=body, headers=headers, timeout=TIMEOUT)

    for headers in ({}, _auth("sk-wrong"), _auth(KEY + "x"), {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"}):
        error = assert_error(call(headers), 401)
        assert error["code"] == "invalid_api_key" and KEY not in error["message"]
    assert call(_auth()).status_code == 200
    assert call({"Authorization": f"bearer {KEY}"}).status_code == 200  # the scheme is case-insensitive
    guarded.wait_idle()


def test_health_is_open_and_the_openai_client_authenticates(guarded: ServerThread) -> None:
    assert httpx.get(guarded.url + "/health", timeout=TIMEOUT).status_code == 200
    client = openai.OpenAI(base_url=guarded.url + "/v1", api_key=KEY, max_retries=0, timeout=TIMEOUT)
    assert client.completions.create(model="stories", prompt="Once", max_tokens=2).choices[0].text is not None
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=guarded.url + "/v1", api_key="sk-wrong", max_retries=0, timeout=TIMEOUT).models.list()
    guarded.wait_idle()


def test_api_key_comes_from_the_flag_or_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVSERVE_API_KEY", "from-env")
    assert build_parser().parse_args(["serve"]).api_key == "from-env"
    assert build_parser().parse_args(["serve", "--api-key", "flag"]).api_key == "flag"
    monkeypatch.delenv("KVSERVE_API_KEY")
    assert build_parser().parse_args(["serve"]).api_key is None


def test_cors_only_for_the_allowed_origins(guarded: ServerThread, trusting: ServerThread) -> None:
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}
    response = httpx.options(guarded.url + "/v1/completions", headers=preflight, timeout=TIMEOUT)
    assert response.status_code == 200 and response.headers["access-control-allow-origin"] == ORIGIN
    other = httpx.options(guarded.url + "/v1/completions", headers={**preflight, "Origin": "http://evil.example"}, timeout=TIMEOUT)
    assert "access-control-allow-origin" not in other.headers
    models = httpx.get(guarded.url + "/v1/models", headers={"Origin": ORIGIN, **_auth()}, timeout=TIMEOUT)
    assert models.headers["access-control-allow-origin"] == ORIGIN
    # off unless --allowed-origins is given
    closed = httpx.options(trusting.url + "/v1/completions", headers=preflight, timeout=TIMEOUT)
    assert "access-control-allow-origin" not in closed.headers
    assert "access-control-allow-origin" not in httpx.get(trusting.url + "/v1/models", headers={"Origin": ORIGIN}, timeout=TIMEOUT).headers


# ---- size and fan-out limits ------------------------------------------------------------


def test_a_body_over_the_limit_is_413_before_it_is_read(guarded: ServerThread) -> None:
    big = json_bytes({"prompt": "x" * (100 << 10), "max_tokens": 2})
    error = assert_error(httpx.post(guarded.url + "/v1/completions", content=big, headers={"content-type": "application/json", **_auth()},
                                    timeout=TIMEOUT), 413)
    assert error["type"] == "invalid_request_error"

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        yield b'{"prompt": "'
        for _ in range(100):
            yield b"x" * 1024
        yield b'"}'

    chunked = httpx.post(guarded.url + "/v1/completions", content=chunks(), headers={"content-type": "application/json", **_auth()},
                         timeout=TIMEOUT)
    assert_error(chunked, 413)
    ok = httpx.post(guarded.url + "/v1/completions", json={"prompt": "Once upon a time " * 20, "max_tokens": 1}, headers=_auth(), timeout=TIMEOUT)
    assert ok.status_code == 200
    guarded.wait_idle()


def test_fan_out_is_limited(guarded: ServerThread) -> None:
    ids = [[5, 6, 7]] * 3
    assert_error(guarded.post("/v1/completions", json={"prompt": ids, "n": 3, "max_tokens": 1}, headers=_auth()), 400, "prompt",
                 ("9 generations", "--max-fan-out"))
    assert_error(guarded.post("/v1/chat/completions", json={"messages": CHAT, "n": 9, "max_tokens": 1}, headers=_auth()), 400, "n",
                 ("at most 8",))
    ok = guarded.post("/v1/completions", json={"prompt": ids, "n": 2, "max_tokens": 1}, headers=_auth())
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 6
    guarded.wait_idle()


# ---- text that is not Unicode, NaN, unknown fields ----------------------------------------


@pytest.mark.parametrize(
    "path, raw, param",
    [
        ("/v1/completions", b'{"prompt": "hi \\ud800", "max_tokens": 2}', "prompt"),
        ("/v1/completions", b'{"model": "\\ud800", "prompt": "hi"}', "model"),
        ("/v1/completions", b'{"prompt": ["ok", "bad \\udfff"]}', "prompt"),
        ("/v1/completions", b'{"prompt": "caf\xe9 au lait", "max_tokens": 2}', "prompt"),
        ("/v1/completions", b'{"prompt": "hi", "stop": ["\xff\xfe"]}', "stop"),
        ("/v1/completions", b'{"prompt": "hi", "logit_bias": {"\\ud800": 1}}', "logit_bias"),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\xc3\x28"}]}', "messages"),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi", "tool_call_id": "\\udc00"}]}', "messages"),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": {"x": ["\\ud83d"]}}',
         "chat_template_kwargs"),
        ("/tokenize", b'{"prompt": "\\ud800"}', "prompt"),
    ],
)
def test_text_that_is_not_unicode_is_400_naming_the_field(trusting: ServerThread, path: str, raw: bytes, param: str) -> None:
    error = assert_error(raw_post(trusting.url, path, raw), 400, param)
    assert "surrogate" in error["message"] or "not valid UTF-8" in error["message"]
    assert httpx.get(trusting.url + "/health", timeout=TIMEOUT).status_code == 200


@pytest.mark.parametrize(
    "field, value",
    [("temperature", float("nan")), ("temperature", float("inf")), ("top_p", float("nan")), ("presence_penalty", float("-inf")),
     ("frequency_penalty", float("nan")), ("min_p", float("inf")), ("repetition_penalty", float("nan"))],
)
def test_nan_and_infinities_are_400(trusting: ServerThread, field: str, value: float) -> None:
    for path, body in (("/v1/completions", {"prompt": "hi"}), ("/v1/chat/completions", {"messages": CHAT})):
        assert_error(raw_post(trusting.url, path, json_bytes({**body, field: value})), 400, field, ("finite",) if field == "temperature" else ())
    assert_error(raw_post(trusting.url, "/v1/completions", json_bytes({"prompt": "hi", "logit_bias": {"5": float("nan")}})), 400, "logit_bias")


@pytest.mark.parametrize(
    "path, extra, param",
    [
        ("/v1/completions", {"frobnicate": 1}, "frobnicate"),
        ("/v1/completions", {"response_format": {"type": "json_object", "strict": True}}, "response_format"),
        ("/v1/chat/completions", {"response_format": {"type": "yaml"}}, "response_format"),
        ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),  # no --tool-call-parser
        ("/v1/chat/completions", {"tool_choice": "auto"}, "tool_choice"),
        ("/v1/chat/completions", {"functions": [{"name": "f"}]}, "functions"),
        ("/v1/chat/completions", {"stream_options": {"include_usage": True, "continuous_usage_stats": True}}, "stream_options"),
        ("/tokenize", {"prompt": "hi", "truncate": True}, "truncate"),
    ],
)
def test_fields_that_would_be_ignored_are_400_naming_them(trusting: ServerThread, path: str, extra: dict, param: str) -> None:
    base = {"prompt": "hi"} if path != "/v1/chat/completions" else {"messages": CHAT}
    assert_error(trusting.post(path, json={**base, **extra}), 400, param)


def test_fields_that_change_nothing_are_accepted(trusting: ServerThread) -> None:
    harmless = {"user": "u1", "metadata": {"k": "v"}, "store": False, "service_tier": "auto", "response_format": {"type": "text"},
                "tool_choice": "none", "parallel_tool_calls": False, "max_tokens": 3, "temperature": 0}
    result = trusting.post("/v1/chat/completions", json={"messages": CHAT, **harmless})
    assert result.status_code == 200, result.text
    plain = trusting.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 3, "temperature": 0})
    assert result.json()["choices"][0]["message"] == plain.json()["choices"][0]["message"]
    trusting.wait_idle()


def test_logit_bias_is_applied(trusting: ServerThread) -> None:
    ids = trusting.post("/tokenize", json={"prompt": " the"}).json()["tokens"]
    forced = trusting.post("/v1/completions", json={"prompt": "Once upon", "max_tokens": 3, "temperature": 0,
                                                    "logit_bias": {str(ids[-1]): 100}, "logprobs": 0})
    assert forced.status_code == 200, forced.text
    assert forced.json()["choices"][0]["logprobs"]["tokens"] == [" the"] * 3
    trusting.wait_idle()


def test_errors_echo_at_most_a_short_piece_of_the_value(trusting: ServerThread) -> None:
    for body in ({"prompt": "hi", "temperature": "x" * 1_000_000}, {"prompt": "hi", "stop": ["y"] * 100_000},
                 {"prompt": "hi", "top_k": 10**300}, {"model": "m" * 1_000_000, "prompt": "hi"}):
        response = trusting.post("/v1/completions", json=body)
        assert response.status_code in (400, 404) and len(response.content) < 2000, len(response.content)


def test_max_completion_tokens_errors_name_it(trusting: ServerThread) -> None:
    error = assert_error(trusting.post("/v1/chat/completions", json={"messages": CHAT, "max_completion_tokens": -1}), 400,
                         "max_completion_tokens")
    assert error["message"].startswith("max_completion_tokens must be")


# ---- chat templates and slow preprocessing -------------------------------------------------


def test_request_chat_templates_are_refused_unless_trusted(guarded: ServerThread, trusting: ServerThread) -> None:
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    body = {"messages": CHAT, "max_tokens": 1}
    assert_error(guarded.post("/v1/chat/completions", json={**body, "chat_template": template}, headers=_auth()), 400,
                 "chat_template", ("--trust-request-chat-template",))
    assert_error(guarded.post("/v1/chat/completions", json={**body, "chat_template_kwargs": {"chat_template": template}},
                              headers=_auth()), 400, "chat_template_kwargs", ("--trust-request-chat-template",))
    for reserved in ({"tokenize": True}, {"return_dict": True}, {"add_generation_prompt": False}):
        assert_error(trusting.post("/v1/chat/completions", json={**body, "chat_template_kwargs": reserved}), 400, "chat_template_kwargs")

    rendered = trusting.post("/v1/chat/completions", json={**body, "chat_template": template, "temperature": 0})
    assert rendered.status_code == 200, rendered.text
    content_only = trusting.post("/tokenize", json={"prompt": CHAT[0]["content"], "add_special_tokens": False}).json()["count"]
    assert rendered.json()["usage"]["prompt_tokens"] == content_only  # the request's template rendered the prompt
    with_variable = trusting.post("/v1/chat/completions", json={**body, "chat_template": "{{ greeting }}", "temperature": 0,
                                                                "chat_template_kwargs": {"greeting": "Hello there"}})
    assert with_variable.status_code == 200 and with_variable.json()["usage"]["prompt_tokens"] == trusting.post(
        "/tokenize", json={"prompt": "Hello there", "add_special_tokens": False}).json()["count"]
    trusting.wait_idle()


def _health_latencies_while(server: ServerThread, work: threading.Thread, timeout: float = 60.0) -> list[float]:
    latencies = []
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=TIMEOUT) as client:
        while work.is_alive():
            assert time.monotonic() < deadline
            started = time.perf_counter()
            assert client.get(server.url + "/health").status_code == 200
            latencies.append(time.perf_counter() - started)
            time.sleep(0.02)
    return latencies


def test_a_runaway_template_is_stopped_and_the_server_keeps_answering(trusting: ServerThread) -> None:
    result: dict[str, httpx.Response] = {}
    work = threading.Thread(target=lambda: result.setdefault("r", trusting.post(
        "/v1/chat/completions", json={"messages": CHAT, "chat_template": RUNAWAY_TEMPLATE})))
    started = time.monotonic()
    work.start()
    latencies = _health_latencies_while(trusting, work)
    assert_error(result["r"], 400, "messages", ("--preprocess-timeout",))
    assert time.monotonic() - started < 10  # 2 s limit; rendering it in full takes ~7 s here
    assert statistics.median(latencies) < 0.1, latencies
    trusting.wait_idle()


def test_health_answers_while_a_5_mb_prompt_is_tokenized(trusting: ServerThread) -> None:
    prompt = ("Once upon a time there was a little girl. " * 125_000)[: 5 << 20]
    result: dict[str, httpx.Response] = {}
    work = threading.Thread(target=lambda: result.setdefault("r", trusting.post("/v1/completions", json={"prompt": prompt})))
    work.start()
    latencies = _health_latencies_while(trusting, work)
    assert len(latencies) >= 5
    assert statistics.median(latencies) < 0.1, latencies
    assert_error(result["r"], 400, "prompt")  # longer than the context (or than the 2 s preprocessing limit)
    trusting.wait_idle()


# ---- a fresh server: names, metrics, shutdown, stalled readers ----------------------------


def test_served_name_is_the_directory_name_and_metrics_read_true_at_start(tiny_llama: Path) -> None:
    handle = ServerThread(EngineConfig(model=str(tiny_llama), dtype="float32", kv_cache_memory_bytes=KV_BYTES), None)
    try:
        models = httpx.get(handle.url + "/v1/models", timeout=TIMEOUT).json()["data"]
        assert [(m["id"], m["root"]) for m in models] == [(tiny_llama.name, tiny_llama.name)]
        metrics = httpx.get(handle.url + "/metrics", timeout=TIMEOUT).text
        assert str(tiny_llama) not in metrics and f'model_name="{tiny_llama.name}"' in metrics
        free = [line for line in metrics.splitlines() if line.startswith("kvserve:kv_cache_free_blocks{")]
        assert float(free[0].rsplit(" ", 1)[1]) == handle.num_blocks  # before any request
        error = assert_error(handle.post("/v1/completions", json={"model": "other", "prompt": "hi"}), 404, "model")
        assert str(tiny_llama) not in error["message"]
    finally:
        handle.stop()


def test_shutdown_cuts_off_non_streaming_requests_with_503(tiny_llama: Path) -> None:
    handle = ServerThread(EngineConfig(model=str(tiny_llama), dtype="float32", kv_cache_memory_bytes=KV_BYTES), "tiny")
    try:
        result: dict[str, httpx.Response] = {}
        body = {"prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True}
        work = threading.Thread(target=lambda: result.setdefault("r", handle.post("/v1/completions", json=body)))
        work.start()
        deadline = time.monotonic() + 30
        while not handle.engine.engine.requests:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        handle.engine._loop.call_soon_threadsafe(handle.engine.begin_shutdown)  # what SIGTERM does
        work.join(30)
        error = assert_error(result["r"], 503, contains=("shutting down",))
        assert error["type"] == "service_unavailable_error"
    finally:
        handle.stop()


def test_a_stream_whose_client_stops_reading_is_cut_off(chat_model_dir: Path) -> None:
    handle = ServerThread(_config(chat_model_dir), "stories", limits=ServerLimits(stream_stall_timeout_s=1.0))
    try:
        body = json_bytes({"prompt": "Once upon a time", "max_tokens": 480, "ignore_eos": True, "n": 64, "logprobs": 5, "stream": True})
        request = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                   f"Content-Length: {len(body)}\r\n\r\n").encode() + body
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.settimeout(TIMEOUT)
            sock.connect(("127.0.0.1", int(handle.url.rsplit(":", 1)[1])))
            sock.sendall(request)
            deadline = time.monotonic() + 30
            while not handle.engine.engine.requests:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            handle.wait_idle(timeout=60)  # the client reads nothing, yet the requests end and their blocks come back
            received = b""
            while chunk := sock.recv(1 << 20):  # now drain what the server sent before it gave up
                received += chunk
        assert received.startswith(b"HTTP/1.1 200")
        assert b"data: [DONE]" not in received  # cut off, not finished
    finally:
        handle.stop()


def test_overloaded_answers_carry_retry_after(tiny_llama: Path) -> None:
    handle = ServerThread(EngineConfig(model=str(tiny_llama), dtype="float32", kv_cache_memory_bytes=KV_BYTES, max_num_seqs=1), "tiny",
                          max_waiting_requests=1)
    try:
        body = {"prompt": "Once upon a time", "max_tokens": 200, "ignore_eos": True}

        async def fire() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=handle.url, timeout=TIMEOUT) as client:
                return await asyncio.wait_for(asyncio.gather(*(client.post("/v1/completions", json=body) for _ in range(5))), 60)

        overloaded = [r for r in asyncio.run(fire()) if r.status_code == 503]
        assert overloaded and all(r.headers["retry-after"] == "1" for r in overloaded)
        handle.wait_idle()
    finally:
        handle.stop()


def test_a_request_the_engine_fails_alone_gets_500_and_the_others_200(trusting: ServerThread, monkeypatch: pytest.MonkeyPatch) -> None:
    sample = Sampler.__call__

    def poisoned(self, logits, inputs):  # a fault inside the step that only this request's rows trigger
        if any(p.seed == 666 for p in inputs.params):
            raise RuntimeError("injected: this row cannot be sampled")
        return sample(self, logits, inputs)

    monkeypatch.setattr(Sampler, "__call__", poisoned)
    good = {"prompt": PROMPT_TEXT, "max_tokens": 30, "ignore_eos": True, "temperature": 0}
    bad = {**good, "seed": 666, "temperature": 1.0}

    async def fire() -> tuple[list[httpx.Response], list[str]]:
        async with httpx.AsyncClient(base_url=trusting.url, timeout=TIMEOUT) as client:
            async def stream() -> list[str]:
                async with client.stream("POST", "/v1/completions", json={**bad, "stream": True}) as response:
                    return [line async for line in response.aiter_lines() if line.startswith("data: ")]

            *responses, events = await asyncio.wait_for(asyncio.gather(
                *(client.post("/v1/completions", json=good) for _ in range(4)), client.post("/v1/completions", json=bad), stream()), 60)
            return responses, events

    responses, events = asyncio.run(fire())
    assert [r.status_code for r in responses[:4]] == [200] * 4
    assert all(r.json()["usage"]["completion_tokens"] == 30 for r in responses[:4])
    error = assert_error(responses[4], 500, contains=("this row cannot be sampled",))
    assert error["code"] == "request_failed"
    assert '"request_failed"' in events[-2] and events[-1] == "data: [DONE]"
    assert httpx.get(trusting.url + "/health", timeout=TIMEOUT).status_code == 200
    trusting.wait_idle()
