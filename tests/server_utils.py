"""Helpers for tests that run real servers: uvicorn on 127.0.0.1 (in a thread or a `kvserve serve` process)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import uvicorn

from kvserve.config import EngineConfig
from kvserve.entrypoints.openai.server import build_app

TIMEOUT = 30.0
KV_BYTES = 64 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """A uvicorn server running `build_app(...)` on a background thread."""

    def __init__(self, config: EngineConfig, name: str | None, **app_kwargs: Any) -> None:
        """`app_kwargs` go to `build_app` (max_waiting_requests, limits, api_key, allowed_origins)."""
        self.app = build_app(config, served_model_name=name, **app_kwargs)
        self.engine = self.app.state.engine
        self.name = name
        self.url = f"http://127.0.0.1:{free_port()}"
        port = int(self.url.rsplit(":", 1)[1])
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)
        self.num_blocks = self.engine.engine.stats().num_blocks

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=TIMEOUT)

    def post(self, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.post(self.url + path, timeout=TIMEOUT, **kwargs)

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Wait until no request runs and every KV block is free again (fails the test otherwise)."""
        deadline = time.monotonic() + timeout
        while self.engine.engine.stats().num_free_blocks != self.num_blocks or self.engine.engine.requests:
            assert time.monotonic() < deadline, "requests still running or KV blocks still held"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)


def sse_events(response: httpx.Response) -> list[Any]:
    """The `data:` payloads of an event stream, parsed; "[DONE]" stays a string."""
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def assert_error(response: httpx.Response, status: int, param: str | None = None, contains: tuple[str, ...] = ()) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    if param is not None:
        assert error["param"] == param, error
    for text in contains:
        assert text in error["message"], error
    return error


class ServeProcess:
    """`kvserve serve` (or `python script args`) in a subprocess on a free port; its output goes to a log file."""

    def __init__(self, args: list[str], log: Path, script: Path | None = None, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        head = [sys.executable, str(script)] if script else [sys.executable, "-m", "kvserve.entrypoints.cli"]
        self.log = log
        self._log_file = open(log, "w")
        self.proc = subprocess.Popen(
            [*head, "serve", "--port", str(self.port), *args], stdout=self._log_file, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        deadline = time.monotonic() + 120
        while True:
            assert self.proc.poll() is None, f"the server exited: {self.output()}"
            assert time.monotonic() < deadline, f"the server did not come up: {self.output()}"
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        self._log_file.flush()
        return self.log.read_text()

    def metric(self, name: str) -> float:
        """The value of an unlabelled-by-reason metric line `name{...} value` (summed over its samples)."""
        text = httpx.get(self.url + "/metrics", timeout=TIMEOUT).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))

    def wait_idle(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while self.metric("kvserve:num_requests_running") or self.metric("kvserve:num_requests_waiting") or self.metric("kvserve:kv_cache_usage_perc"):
            assert time.monotonic() < deadline, "requests still running or KV blocks still held"
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log_file.close()


def raw_post(url: str, path: str, body: bytes, timeout: float = TIMEOUT) -> httpx.Response:
    """POST bytes as they are (NaN literals, invalid UTF-8) with a JSON content type."""
    return httpx.post(url + path, content=body, headers={"content-type": "application/json"}, timeout=timeout)


def json_bytes(body: Any) -> bytes:
    """`body` as JSON text, NaN and Infinity spelled as Python's json module spells them."""
    return json.dumps(body, allow_nan=True).encode()
