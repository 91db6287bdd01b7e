"""Bounded memory, shown (issue 18, part 4): one request streams far past the window and the model's length
with a constant number of KV blocks and flat RSS, and the server streams such a request without refusing
it for length."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from kvserve.config import EngineConfig
from conftest import REPO, STORIES
from server_utils import KV_BYTES, ServerThread, sse_events

pytestmark = pytest.mark.skipif(not STORIES.exists(), reason="needs ../shared/models/stories260K")


def stream(tokens: int, window: int, timeout: int) -> dict:
    """benchmarks/streaming_memory.py on stories260K (4 sinks), in a fresh process: its result."""
    run = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "streaming_memory.py"), "--tokens", str(tokens), "--window", str(window),
         "--every", "100", "--json"], capture_output=True, text=True, timeout=timeout,
    )
    assert run.returncode == 0, (run.stdout[-3000:], run.stderr[-3000:])
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_two_thousand_tokens_in_the_blocks_of_the_window():
    """6x past stories260K's 512 positions, 15x past a 128-token window: 9 or 10 blocks of 16 all along
    (the sink block and the window's), where dense attention would need 126."""
    result = stream(2000, 128, timeout=300)
    assert result["finish_reason"] == "length" and result["blocks_seen"] == [9, 10] and result["blocks_leaked"] == 0
    assert result["rss_growth_mib"] < 16


@pytest.mark.slow
def test_a_hundred_thousand_tokens_with_a_window_of_1024():
    result = stream(100_000, 1024, timeout=3600)
    assert result["blocks_seen"] == [65, 66] and result["kv_blocks_dense"] > 6000 and result["rss_growth_mib"] < 64


def test_the_server_streams_past_max_model_len(stories_dir: Path):
    """max_tokens 1,500 with a 512-token model: a 400 without --sliding-window, a full stream with it."""
    body = dict(model="s", prompt="Once upon a time", max_tokens=1500, temperature=0.0, ignore_eos=True, stream=True)
    plain = ServerThread(EngineConfig(model=str(stories_dir), dtype="float32", kv_cache_memory_bytes=KV_BYTES), "s")
    try:
        response = plain.post("/v1/completions", json={**body, "stream": False})
        assert response.status_code == 400 and "maximum context length" in response.text
    finally:
        plain.stop()
    config = EngineConfig(model=str(stories_dir), dtype="float32", kv_cache_memory_bytes=KV_BYTES, sliding_window=64,
                          attention_sinks=4)
    server = ServerThread(config, "s")
    try:
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=120) as response:
            assert response.status_code == 200
            events = sse_events(response)
        assert events[-1] == "[DONE]"
        chunks = [e for e in events[:-1] if e["choices"]]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        text = "".join(c["choices"][0]["text"] for c in chunks)
        assert len(server.engine.engine.tokenizer(text, add_special_tokens=False).input_ids) >= 1400
        server.wait_idle()
    finally:
        server.stop()
