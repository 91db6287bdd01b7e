"""`kvserve serve` in a subprocess against hostile input: every case of the hardening issue, a random sweep of
single-field mutations over both endpoints, an engine that dies, and (slow) a memory soak.

After each part the server must still be the same process, answer /health, hold no request and no KV block.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from server_utils import KV_BYTES, TIMEOUT, ServeProcess, assert_error, json_bytes, raw_post

PROMPT = "Once upon a time"
CHAT = [{"role": "user", "content": "Tell me a story."}]
MAX_REQUEST_BYTES = 1 << 20


@pytest.fixture(scope="module")
def served(chat_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    args = ["--model", str(chat_model_dir), "--dtype", "float32", "--kv-cache-memory-bytes", str(KV_BYTES),
            "--max-num-seqs", "64", "--served-model-name", "stories", "--max-request-bytes", str(MAX_REQUEST_BYTES)]
    proc = ServeProcess(args, tmp_path_factory.mktemp("fuzz") / "server.log")
    yield proc
    proc.stop()


def assert_unharmed(served: ServeProcess) -> None:
    assert served.proc.poll() is None, served.output()
    assert httpx.get(served.url + "/health", timeout=TIMEOUT).status_code == 200
    served.wait_idle()
    log = served.output()
    assert "Traceback" not in log and "internal error" not in log, log[-3000:]


# ---- every case of the issue ------------------------------------------------------------

ISSUE_CASES: list[tuple[str, str, bytes, int, str | None]] = [
    ("top_k past int64", "/v1/completions", json_bytes({"prompt": "Hi", "max_tokens": 3, "top_k": 9223372036854775808}), 400, "top_k"),
    ("top_k past the vocabulary", "/v1/completions", json_bytes({"prompt": "Hi", "max_tokens": 3, "top_k": 10**6}), 400, "top_k"),
    ("a looping request template", "/v1/chat/completions", json_bytes({"messages": CHAT, "chat_template_kwargs": {
        "chat_template": "{% for i in range(1000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}x"}}), 400, "chat_template_kwargs"),
    ("a gigabyte request template", "/v1/chat/completions", json_bytes({"messages": CHAT, "chat_template": "{{ 'x' * 10**9 }}"}), 400,
     "chat_template"),
    ("a body over the limit", "/v1/completions", json_bytes({"prompt": "x" * (2 * MAX_REQUEST_BYTES)}), 413, None),
    ("token ids over the limit", "/v1/completions", json_bytes({"prompt": [5] * MAX_REQUEST_BYTES}), 413, None),
    ("temperature NaN", "/v1/completions", b'{"prompt": "Hi", "temperature": NaN}', 400, "temperature"),
    ("temperature Infinity", "/v1/chat/completions", json_bytes({"messages": CHAT, "temperature": float("inf")}), 400, "temperature"),
    ("a lone surrogate in the prompt", "/v1/completions", b'{"prompt": "hi \\ud800"}', 400, "prompt"),
    ("a lone surrogate in the model", "/v1/completions", b'{"model": "\\ud800", "prompt": "hi"}', 400, "model"),
    ("invalid UTF-8 in a message", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\xff"}]}', 400, "messages"),
    ("1,000 prompts x n=64", "/v1/completions", json_bytes({"prompt": [[5, 6]] * 1000, "n": 64, "max_tokens": 1}), 400, "prompt"),
    ("max_completion_tokens=-1", "/v1/chat/completions", json_bytes({"messages": CHAT, "max_completion_tokens": -1}), 400,
     "max_completion_tokens"),
    ("a schema that does not compile", "/v1/chat/completions",
     json_bytes({"messages": CHAT, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "x"}}}}),
     400, "response_format"),
    ("an unknown field", "/v1/completions", json_bytes({"prompt": "Hi", "best_effort": True}), 400, "best_effort"),
    ("a 200 KB bad value", "/v1/completions", json_bytes({"prompt": "Hi", "temperature": "x" * 200_000}), 400, "temperature"),
]


@pytest.mark.parametrize("name, path, body, status, param", ISSUE_CASES, ids=[c[0] for c in ISSUE_CASES])
def test_every_case_of_the_issue_fails_alone(served: ServeProcess, name: str, path: str, body: bytes, status: int, param: str | None) -> None:
    response = raw_post(served.url, path, body)
    assert_error(response, status, param)
    assert len(response.content) < 2000  # the bad value is not echoed back whole
    assert_unharmed(served)


# ---- a random sweep ------------------------------------------------------------------------

_DELETE = object()
VALUES: list[Any] = [
    _DELETE, None, True, False, 0, 1, -1, 2, 3, 20, 21, 64, 65, 511, 512, 600, 2**31, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**30,
    0.0, 0.5, -0.5, 1.5, 2.5, 1e-9, 1e308, float("nan"), float("inf"), float("-inf"), "", "x", "hi \ud800", "\udcff", "x" * 5000,
    "stories", "gpt-4", "12", [], [1], [0, 1, 2], [-1], [2**70], ["a"], ["", "b"], [[]], [[5, 6]], [None], [{"a": 1}], {}, {"a": 1},
    {"1": 1000}, {"5": -100}, {"x": "y"}, {"type": "text"}, {"type": "json_object"}, {"include_usage": True},
    [{"role": "user", "content": "hi"}], [{"role": "user"}], [{"content": "hi"}], [{"role": "user", "content": [{"type": "image_url"}]}],
]
COMMON = ["model", "temperature", "top_p", "n", "stream", "stream_options", "stop", "seed", "presence_penalty", "frequency_penalty",
          "logit_bias", "user", "metadata", "top_k", "min_p", "repetition_penalty", "ignore_eos", "min_tokens", "stop_token_ids",
          "include_stop_str_in_output", "skip_special_tokens", "bad_words", "allowed_token_ids", "max_tokens", "not_a_field"]
FIELDS = {
    "/v1/completions": COMMON + ["prompt", "logprobs", "echo", "suffix", "best_of", "add_special_tokens"],
    "/v1/chat/completions": COMMON + ["messages", "max_completion_tokens", "logprobs", "top_logprobs", "add_generation_prompt",
                                      "continue_final_message", "tools", "tool_choice", "response_format", "chat_template",
                                      "chat_template_kwargs", "functions"],
}
BASES = {
    "/v1/completions": {"model": "stories", "prompt": PROMPT, "max_tokens": 4, "temperature": 0.7},
    "/v1/chat/completions": {"model": "stories", "messages": CHAT, "max_tokens": 4, "temperature": 0.7},
}


def _check(response: httpx.Response, mutation: str) -> None:
    assert response.status_code in (200, 400, 404, 413, 422), (mutation, response.status_code, response.text[:500])
    if response.status_code == 200:
        if response.headers["content-type"].startswith("text/event-stream"):
            events = [line for line in response.text.splitlines() if line.startswith("data: ")]
            assert events[-1] == "data: [DONE]" and not any('"error"' in e for e in events), (mutation, response.text[-500:])
        return
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, mutation
    assert len(error["message"]) < 1000, mutation
    if response.status_code == 400:
        assert error["param"] is not None, (mutation, error)


def test_a_random_sweep_of_single_field_mutations(served: ServeProcess) -> None:
    rng = random.Random(20261204)
    seen: dict[int, int] = {}
    with httpx.Client(timeout=60) as client:
        for i in range(520):
            path = list(FIELDS)[i % 2]
            field = rng.choice(FIELDS[path])
            value = rng.choice(VALUES)
            body = dict(BASES[path])
            if value is _DELETE:
                body.pop(field, None)
            else:
                body[field] = value
            mutation = f"{path} {field}={'<deleted>' if value is _DELETE else repr(value)[:60]}"
            response = client.post(served.url + path, content=json_bytes(body), headers={"content-type": "application/json"})
            _check(response, mutation)
            seen[response.status_code] = seen.get(response.status_code, 0) + 1
            if i % 100 == 99:
                assert_unharmed(served)
    assert seen.get(200, 0) > 50 and seen.get(400, 0) > 100, seen  # both kinds were exercised
    assert_unharmed(served)


# ---- an engine that dies ---------------------------------------------------------------------

FAULTY_SERVER = '''
import sys
from kvserve.engine.model_runner import ModelRunner
from kvserve.entrypoints.cli import main

execute = ModelRunner.execute

def fails_when_shared(self, output):
    """A fault no single request explains: any batch of two or more requests fails, each alone runs."""
    if len(set(output.request_ids().values())) > 1:
        raise RuntimeError("injected fault: the batch cannot run")
    return execute(self, output)

ModelRunner.execute = fails_when_shared
sys.exit(main(sys.argv[1:]))
'''


def test_an_engine_fault_no_request_explains_ends_the_server_nonzero(tiny_llama: Path, tmp_path: Path) -> None:
    script = tmp_path / "faulty_server.py"
    script.write_text(FAULTY_SERVER)
    proc = ServeProcess(["--model", str(tiny_llama), "--dtype", "float32", "--kv-cache-memory-bytes", str(KV_BYTES)],
                        tmp_path / "server.log", script=script)
    try:
        body = {"prompt": PROMPT, "max_tokens": 300, "ignore_eos": True}

        async def two_requests() -> tuple[list[str], httpx.Response]:
            async with httpx.AsyncClient(base_url=proc.url, timeout=TIMEOUT) as client:
                async def stream() -> list[str]:
                    async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
                        return [line async for line in response.aiter_lines() if line.startswith("data: ")]

                return await asyncio.wait_for(asyncio.gather(stream(), client.post("/v1/completions", json=body)), 60)

        started = time.monotonic()
        events, response = asyncio.run(two_requests())
        error = assert_error(response, 503)
        assert error["code"] == "engine_dead" and "no single request explains it" in error["message"]
        assert json.loads(events[-2][6:])["error"]["code"] == "engine_dead" and events[-1] == "data: [DONE]"
        assert proc.proc.wait(10) == 1  # exits nonzero within seconds, for a supervisor to restart it
        assert time.monotonic() - started < 30
        assert "the engine died" in proc.output()
    finally:
        proc.stop()


# ---- the soak (slow) ---------------------------------------------------------------------------


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


@pytest.mark.slow
def test_memory_stays_flat_over_20000_requests(served: ServeProcess) -> None:
    """RSS after a warm-up of 2,000 requests, then per 1,000 of 20,000 more: growth must stay under 5 MB."""
    rng = random.Random(7)

    async def burst(count: int) -> None:
        async with httpx.AsyncClient(base_url=served.url, timeout=TIMEOUT) as client:
            queue = list(range(count))

            async def worker() -> None:
                while queue:
                    i = queue.pop()
                    if i % 2:
                        body = {"prompt": f"{PROMPT} {rng.randrange(1000)}", "max_tokens": 4, "seed": i, "stream": i % 4 == 1}
                        response = await client.post("/v1/completions", json=body)
                    else:
                        body = {"messages": [{"role": "user", "content": f"story {rng.randrange(1000)}"}], "max_tokens": 4}
                        response = await client.post("/v1/chat/completions", json=body)
                    assert response.status_code == 200, response.text

            await asyncio.gather(*(worker() for _ in range(8)))

    asyncio.run(burst(2000))
    baseline = _rss_mb(served.pid)
    readings = []
    for thousand in range(1, 21):
        asyncio.run(burst(1000))
        readings.append(_rss_mb(served.pid))
        print(f"after {thousand * 1000:>6} requests: RSS {readings[-1]:.1f} MB ({readings[-1] - baseline:+.1f} MB)", file=sys.stderr)
    assert readings[-1] - baseline < 5, readings
    assert_unharmed(served)
