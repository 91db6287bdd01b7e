"""llama.cpp's `llama-server` as a peer: continuous batching over parallel slots (`--compare llama-server`).

llama-cpp-python runs one sequence at a time, which is not how llama.cpp serves
many requests: its server decodes up to ``-np`` sequences together. Given
``--llama-server PATH`` (a llama-server binary; docs/PERFORMANCE.md says how to
build one), this runner starts it on the same GGUF the llama.cpp peer runs (at
kvserve's precision, see `llama_cpp_runner.peer_gguf`), on a free local port,
with ``--llama-server-slots`` slots of the workload's longest sequence each and
torch's thread count, and stops it when the benchmark is done (or the process
exits).

Requests go to the server's native ``/completion`` endpoint: prompts as token
ids (no tokenizer in between), ``n_predict`` = the output length, greedy
(temperature 0), EOS ignored, no prompt cache, the generated ids returned.

- A workload (``generate``) is submitted all together, at most twice the number
  of slots in flight: the server always has a request waiting for a slot that
  frees, without hundreds of idle connections. Its requests are not streamed:
  one response per request, so on a small machine the client does not take CPU
  from the server with an event per token. The run is timed from the first
  request to the last response. Each request's time to first token is estimated
  as its latency minus the server's own generation time (``timings.predicted_ms``).
- One request on its own (``stream``) is streamed, every token timed. llama-server
  holds back tokens that end in an incomplete UTF-8 character and then sends only
  the id of the token that completed it (random-token prompts make this common):
  the held-back tokens are timed when they arrive (``tokens_predicted`` counts
  them), and when an id was held back, all ids come from the same request sent
  again without streaming, untimed (greedy decoding gives the same tokens).
"""

from __future__ import annotations

import asyncio
import atexit
import json
import os
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from typing import Any

import httpx
from tqdm import tqdm

from kvserve.bench.llama_cpp_runner import gguf_tensor_types
from kvserve.bench.runner import BatchRun, StreamTiming, median
from kvserve.bench.workload import Workload

DEFAULT_SLOTS = 16
BUILD_HINT = "build one as docs/PERFORMANCE.md describes (\"A local llama-server\")"
# The per-slot context is rounded up to this (llama.cpp sizes its KV cache in multiples of 256 cells).
_CONTEXT_GRANULE = 256


def llama_server_skip_reason(binary: str | None) -> str | None:
    """Why ``--llama-server`` cannot run, or None when the binary is there (the GGUF is checked separately)."""
    if binary is None:
        return f"no --llama-server PATH was given; {BUILD_HINT} and pass its path"
    if not os.path.isfile(binary):
        return f"llama-server binary {binary} does not exist; {BUILD_HINT}"
    if not os.access(binary, os.X_OK):
        return f"llama-server binary {binary} is not executable"
    return None


def slot_context(max_seq_len: int) -> int:
    """Context per slot: the longest sequence (prompt + output) plus one, rounded up to 256."""
    return -(-(max_seq_len + 1) // _CONTEXT_GRANULE) * _CONTEXT_GRANULE


def server_command(binary: str, gguf_path: str, port: int, slots: int, context_per_slot: int,
                   threads: int) -> list[str]:
    """The llama-server command line: ``slots`` slots of ``context_per_slot`` tokens, continuous batching.

    ``-c`` is the total context, split evenly among the slots. ``--cache-ram 0``
    turns off the host-memory prompt cache (the requests also ask for no prompt
    cache), so that no request reuses another's prefill.
    """
    if slots < 1:
        raise ValueError(f"llama-server needs at least 1 slot, got {slots}")
    return [binary, "-m", gguf_path, "--host", "127.0.0.1", "--port", str(port),
            "-np", str(slots), "-c", str(slots * context_per_slot), "-t", str(threads), "-tb", str(threads),
            "--cont-batching", "--cache-ram", "0", "--no-webui"]


# Stands for a token id llama-server did not send in its stream (see the module docstring).
HELD_BACK = -1


def completion_body(prompt_token_ids: list[int], max_tokens: int, stream: bool) -> dict[str, Any]:
    """A greedy ``/completion`` request for exactly ``max_tokens`` tokens, returning their ids."""
    return {"prompt": list(prompt_token_ids), "n_predict": max_tokens, "temperature": 0.0, "top_k": 1,
            "repeat_penalty": 1.0, "ignore_eos": True, "cache_prompt": False, "stream": stream,
            "return_tokens": True}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def binary_version(binary: str) -> str:
    """``version: 1 (0c1e570)``-style line of ``llama-server --version``, or "unknown"."""
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    lines = [line.strip() for line in (out.stdout + out.stderr).splitlines() if line.startswith("version")]
    return lines[0] if lines else "unknown"


class LlamaServerRunner:
    name = "llama-server"

    def __init__(self, process: subprocess.Popen, base_url: str, command: list[str], log_path: str,
                 gguf_path: str, tensor_types: str, slots: int, context_per_slot: int, version: str,
                 gguf_source: str | None = None, request_timeout_s: float = 600.0) -> None:
        self.process = process
        self.base_url = base_url
        self.command = command
        self.log_path = log_path
        self.gguf_path = gguf_path
        self.tensor_types = tensor_types
        self.slots = slots
        self.context_per_slot = context_per_slot
        self.version = version
        self.gguf_source = gguf_source
        self.request_timeout_s = request_timeout_s
        self.last_ttft_s: list[float] = []
        atexit.register(self.close)

    @classmethod
    def start(cls, binary: str, gguf_path: str, slots: int, max_seq_len: int, threads: int,
              gguf_source: str | None = None, startup_timeout_s: float = 300.0) -> LlamaServerRunner:
        """Start llama-server and wait until it has loaded the model (``/health`` answers 200)."""
        context = slot_context(max_seq_len)
        port = free_port()
        command = server_command(binary, gguf_path, port, slots, context, threads)
        log = tempfile.NamedTemporaryFile("w", prefix="llama-server-", suffix=".log", delete=False)
        print(f"starting llama-server (log: {log.name}): {' '.join(command)}")
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        runner = cls(process, f"http://127.0.0.1:{port}", command, log.name, gguf_path,
                     gguf_tensor_types(gguf_path), slots, context, binary_version(binary), gguf_source)
        try:
            runner.wait_ready(startup_timeout_s)
        except BaseException:
            runner.close()
            raise
        return runner

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"llama-server exited with status {self.process.returncode} while starting:\n"
                                   f"{self.log_tail()}")
            try:
                if httpx.get(self.base_url + "/health", timeout=5.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass  # not listening yet, or still loading
            if time.monotonic() > deadline:
                raise RuntimeError(f"llama-server did not answer /health within {timeout_s:.0f} s:\n{self.log_tail()}")
            time.sleep(0.2)

    def log_tail(self, num_lines: int = 20) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-num_lines:])
        except OSError:
            return "(no log)"

    def close(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 10 s); safe to call more than once."""
        atexit.unregister(self.close)
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def settings(self) -> dict[str, Any]:
        settings: dict[str, Any] = {
            "version": f"llama-server {self.version}",
            "command": " ".join(self.command),
            "gguf": self.gguf_path,
            "gguf_tensor_types": self.tensor_types,
            "batching": f"continuous batching over {self.slots} slots of {self.context_per_slot} tokens",
        }
        if self.gguf_source is not None:
            settings["gguf_source"] = self.gguf_source
        if self.last_ttft_s:
            ordered = sorted(self.last_ttft_s)
            settings["last_run_ttft_s"] = {"median": median(ordered),
                                           "p99": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
                                           "how": "from each request's submission to its response, "
                                                  "minus llama-server's timings.predicted_ms"}
        return settings

    def _client(self, max_connections: int) -> httpx.AsyncClient:
        timeout = httpx.Timeout(self.request_timeout_s, connect=10.0, pool=None)
        return httpx.AsyncClient(base_url=self.base_url, timeout=timeout,
                                 limits=httpx.Limits(max_connections=max_connections))

    async def _complete(self, client: httpx.AsyncClient, prompt_token_ids: list[int],
                        max_tokens: int) -> tuple[list[int], float]:
        """One request, not streamed: ``(generated ids, estimated time to first token)``."""
        start = time.perf_counter()
        response = await client.post("/completion", json=completion_body(prompt_token_ids, max_tokens, False))
        latency = time.perf_counter() - start
        if response.status_code != 200:
            raise RuntimeError(f"llama-server answered HTTP {response.status_code}: {response.text[:500]}")
        result = response.json()
        ids = [int(t) for t in result.get("tokens") or []]
        predicted_ms = (result.get("timings") or {}).get("predicted_ms")
        return ids, latency - predicted_ms / 1000 if predicted_ms is not None else latency

    async def _stream(self, client: httpx.AsyncClient, prompt_token_ids: list[int],
                      max_tokens: int) -> StreamTiming:
        timing = StreamTiming(time.perf_counter())
        body = completion_body(prompt_token_ids, max_tokens, True)
        async with client.stream("POST", "/completion", json=body) as r:
            if r.status_code != 200:
                text = (await r.aread()).decode(errors="replace")[:500]
                raise RuntimeError(f"llama-server answered HTTP {r.status_code}: {text}")
            async for line in r.aiter_lines():
                read_stream_line(line, timing, time.perf_counter())
        if HELD_BACK in timing.token_ids:
            timing.token_ids = (await self._complete(client, prompt_token_ids, max_tokens))[0]
        return timing

    async def _run_all(self, workload: Workload,
                       on_done: Callable[[], None]) -> tuple[list[tuple[list[int], float]], float]:
        in_flight = max(1, 2 * self.slots)
        semaphore = asyncio.Semaphore(in_flight)

        async def one(prompt: list[int], max_tokens: int) -> tuple[list[int], float]:
            async with semaphore:
                result = await self._complete(client, prompt, max_tokens)
            on_done()
            return result

        async with self._client(in_flight) as client:
            start = time.perf_counter()
            tasks = [asyncio.create_task(one(r.prompt_token_ids, r.output_len)) for r in workload.requests]
            try:
                results = await asyncio.gather(*tasks)
            except BaseException:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise
            return list(results), time.perf_counter() - start

    def generate(self, workload: Workload, progress: bool) -> BatchRun:
        self._check_alive()
        with tqdm(total=len(workload.requests), desc="llama-server requests", unit="req", disable=not progress,
                  dynamic_ncols=True) as bar:
            results, elapsed = asyncio.run(self._run_all(workload, lambda: bar.update(1)))
        self.last_ttft_s = [ttft for _, ttft in results]
        return BatchRun(elapsed, [ids for ids, _ in results])

    def stream(self, prompt_token_ids: list[int], max_tokens: int) -> StreamTiming:
        self._check_alive()

        async def run() -> StreamTiming:
            async with self._client(1) as client:
                return await self._stream(client, prompt_token_ids, max_tokens)

        return asyncio.run(run())

    def _check_alive(self) -> None:
        if self.process.poll() is not None:
            raise RuntimeError(f"llama-server has exited (status {self.process.returncode}):\n{self.log_tail()}")


def read_stream_line(line: str, timing: StreamTiming, now: float) -> None:
    """Add the tokens of one line of ``/completion``'s event stream to ``timing``; raises on an error event.

    An event's ``tokens_predicted`` counts the tokens generated so far: the new
    ones are stamped with the event's arrival time. Its ``tokens`` holds only the
    last of them; the ids of tokens the server held back are `HELD_BACK`.
    """
    if line.startswith("error:"):
        raise RuntimeError(f"llama-server: {line[6:].strip()}")
    if not line.startswith("data:"):
        return
    payload = line[5:].strip()
    if not payload or payload == "[DONE]":
        return
    event = json.loads(payload)
    if "error" in event:
        raise RuntimeError(f"llama-server: {event['error']}")
    ids = [int(t) for t in event.get("tokens") or []]
    count = event.get("tokens_predicted", len(timing.token_ids) + len(ids))
    new = count - len(timing.token_ids)
    if new <= 0:
        return
    timing.token_times.extend([now] * new)
    timing.token_ids.extend([HELD_BACK] * max(0, new - len(ids)) + ids[-new:])
