"""The `kvserve` command line: generate streams text; chat keeps the conversation and reuses its KV blocks."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest

from kvserve import LLMEngine, SamplingParams
from kvserve.entrypoints.chat import StreamReader, run_chat_session

def test_generate_streams_the_completion(stories_dir):
    result = subprocess.run(
        [sys.executable, "-m", "kvserve.entrypoints.cli", "generate", "Once upon a time", "--model", str(stories_dir),
         "--max-tokens", "20", "--dtype", "float32", "--kv-cache-memory-bytes", str(4 << 20)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Once upon a time, there was a little girl named Lily.")


def test_generate_reports_bad_input_cleanly(stories_dir):
    result = subprocess.run(
        [sys.executable, "-m", "kvserve.entrypoints.cli", "generate", "hi", "--model", str(stories_dir), "--temperature", "-1"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "temperature must be a number >= 0" in result.stderr


def test_chat_session_keeps_history_and_hits_the_prefix_cache(chat_llama):
    engine = LLMEngine.from_engine_args(model=str(chat_llama), dtype="float32", kv_cache_memory_bytes=16 << 20, block_size=4)
    inp = io.StringIO("Hello there, how are you today?\nTell me more about the fox.\n/exit\n")
    out = io.StringIO()
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    assert run_chat_session(engine, params, "Be brief.", True, StreamReader(inp, out), out) == 0
    lines = [line for line in out.getvalue().splitlines() if line.startswith("[prompt")]
    assert len(lines) == 2
    first_cached = int(lines[0].split(",")[1].split()[0])
    second_cached = int(lines[1].split(",")[1].split()[0])
    assert first_cached == 0 and second_cached >= 16  # the first turn's blocks are reused
    assert engine.stats().num_free_blocks == engine.stats().num_blocks


def test_chat_without_template_is_a_clear_error(tiny_llama):
    engine = LLMEngine.from_engine_args(model=str(tiny_llama), dtype="float32", kv_cache_memory_bytes=4 << 20)
    with pytest.raises(ValueError, match="no chat template"):
        run_chat_session(engine, SamplingParams(max_tokens=2), None, False, StreamReader(io.StringIO("hi\n"), io.StringIO()),
                         io.StringIO())
