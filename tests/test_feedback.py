"""What kvserve tells its user: start-up phases, a fast --help, a line per request and periodic stats."""

from __future__ import annotations

import logging
import subprocess
import sys
import time

import httpx
import pytest

from kvserve import LLM, EngineConfig, huge_pages, native, startup
from kvserve.engine.async_engine import FinishedRequest, IterationStats
from kvserve.engine.llm_engine import StepStats
from kvserve.engine.scheduler import SchedulerStats
from kvserve.stat_logger import StatLogger
from server_utils import TIMEOUT, ServeProcess, ServerThread


def test_help_is_fast_and_imports_neither_torch_nor_transformers():
    code = ("import sys\nfrom kvserve.entrypoints.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('heavy:', sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules))")
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    elapsed = time.perf_counter() - started
    assert result.returncode == 0, result.stderr
    assert "generate" in result.stdout and "serve" in result.stdout and "estimate" in result.stdout
    assert result.stdout.strip().endswith("heavy: []")
    assert elapsed < 2.0, f"kvserve --help took {elapsed:.2f} s"


def test_each_start_up_phase_and_the_total_are_logged(tiny_llama, monkeypatch, caplog):
    monkeypatch.setattr(startup, "SLOW_PHASE_S", -1.0)  # every phase is "slow": the tiny model loads in well under 1 s
    with caplog.at_level(logging.INFO, logger="kvserve.startup"):
        LLM(str(tiny_llama), dtype="float32", kv_cache_memory_bytes=4 << 20)
    phases = [m.rsplit(" took ", 1)[0] for m in caplog.messages if " took " in m]
    placing = ["placing the weights on 2 MB pages"] if huge_pages.available() else []  # (a part of loading the model)
    assert phases == ["reading the model's config", "loading the tokenizer", *placing, "loading the model", "allocating the KV cache"]
    assert caplog.messages[-1].startswith(f"the engine for {tiny_llama.name} ready in ")


def test_quick_phases_say_nothing_but_the_total(tiny_llama, monkeypatch, caplog):
    monkeypatch.setattr(startup, "SLOW_PHASE_S", 1e9)
    with caplog.at_level(logging.INFO, logger="kvserve.startup"):
        LLM(str(tiny_llama), dtype="float32", kv_cache_memory_bytes=4 << 20)
    assert [m for m in caplog.messages if " took " in m] == []
    assert len(caplog.messages) == 1 and " ready in " in caplog.messages[0]


def test_a_kernel_build_is_announced_as_first_run_only(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("KVSERVE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(startup, "SLOW_PHASE_S", -1.0)
    native.build.cache_clear()
    try:
        with caplog.at_level(logging.INFO, logger="kvserve.startup"):
            assert native.build("pointwise.cpp") is not None
    finally:
        native.build.cache_clear()  # later builds load from the usual cache again
    assert caplog.messages[0] == "building the C++ kernel pointwise.cpp for this CPU (first run only, the result is cached) ..."
    assert caplog.messages[1].startswith("building the C++ kernel pointwise.cpp for this CPU took ")


def test_the_cli_shows_start_up_lines_at_its_default_level(tiny_llama):
    result = subprocess.run([sys.executable, "-m", "kvserve.entrypoints.cli", "generate", "Hi", "-m", str(tiny_llama),
                             "--dtype", "float32", "--max-tokens", "2", "--kv-cache-memory-bytes", "4MiB"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"INFO kvserve.startup: the engine for {tiny_llama.name} ready in " in result.stderr
    assert "INFO kvserve: " not in result.stderr  # the engine's other INFO lines stay at --log-level INFO


# ---- the server's log: a line per request, stats while busy -----------------------------------------------------


@pytest.mark.parametrize("log_requests", [True, False])
def test_each_finished_request_is_logged_unless_disabled(tiny_llama, caplog, log_requests):
    handle = ServerThread(EngineConfig(model=str(tiny_llama), dtype="float32", kv_cache_memory_bytes=4 << 20), "tiny",
                          log_requests=log_requests)
    try:
        with caplog.at_level(logging.INFO, logger="kvserve.stats"):
            reply = handle.post("/v1/completions", json={"prompt": "Hi there", "max_tokens": 3, "ignore_eos": True})
            assert reply.status_code == 200
            handle.wait_idle()
    finally:
        handle.stop()
    lines = [m for m in caplog.messages if m.startswith("request ")]
    if not log_requests:
        assert lines == []
        return
    (line,) = lines
    prompt_tokens = reply.json()["usage"]["prompt_tokens"]
    assert f": length, prompt {prompt_tokens} tokens, output 3 tokens, TTFT " in line
    assert line.startswith(f"request {reply.json()['id']}") and line.endswith(" s in all")


@pytest.mark.slow
def test_kvserve_serve_logs_requests_by_default(tiny_llama, tmp_path):
    server = ServeProcess([str(tiny_llama), "--dtype", "float32", "--kv-cache-memory-bytes", "4MiB"], tmp_path / "serve.log")
    try:
        reply = httpx.post(server.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=TIMEOUT)
        assert reply.status_code == 200
        server.wait_idle()
        deadline = time.monotonic() + 10
        while f"INFO kvserve.stats: request {reply.json()['id']}" not in server.output():
            assert time.monotonic() < deadline, server.output()
            time.sleep(0.1)
        assert f"INFO kvserve.startup: the engine for {tiny_llama.name} ready in " in server.output()
    finally:
        server.stop()


def _iteration(running: int, waiting: int, prefill: int, generated: int, queries: int, hits: int) -> IterationStats:
    engine = SchedulerStats(num_running=running, num_waiting=waiting, num_preemptions=0, num_blocks=100, block_size=16,
                            num_free_blocks=75, num_cached_free_blocks=0, kv_cache_usage=0.25,
                            prefix_cache_queries=queries, prefix_cache_hits=hits)
    return IterationStats(engine=engine, step=StepStats(num_prefill_tokens=prefill), generation_tokens=generated)


def test_stats_line_every_interval_while_busy(caplog):
    now = [0.0]
    stats = StatLogger(interval_s=10.0, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="kvserve.stats"):
        stats.observe(_iteration(2, 1, prefill=0, generated=0, queries=100, hits=0))  # before: 100 looked up
        now[0] = 4.0
        stats.observe(_iteration(2, 1, prefill=300, generated=50, queries=300, hits=50))
        assert caplog.messages == []  # within the interval
        now[0] = 10.0
        stats.observe(_iteration(3, 0, prefill=200, generated=50, queries=500, hits=150))
        assert caplog.messages == ["prompt 50.0 tok/s, generation 10.0 tok/s; running 3, waiting 0 requests; KV cache 25.0% "
                                   "used; prefix cache hit rate 37.5%"]
        now[0] = 30.0
        stats.observe(_iteration(0, 0, prefill=0, generated=0, queries=500, hits=150))  # idle: nothing to say
        assert len(caplog.messages) == 1


def test_request_lines_name_what_the_request_did(caplog):
    logger = StatLogger(log_stats=False)
    with caplog.at_level(logging.INFO, logger="kvserve.stats"):
        logger.observe(IterationStats(finished=[FinishedRequest("cmpl-1-0", "abort", 7, 0, None, 0.25),
                                                FinishedRequest("cmpl-2-0", "stop", 7, 12, 0.0812, 1.5)]))
    assert caplog.messages == [
        "request cmpl-1-0: abort, prompt 7 tokens, output 0 tokens, no token, 0.250 s in all",
        "request cmpl-2-0: stop, prompt 7 tokens, output 12 tokens, TTFT 0.081 s, 1.500 s in all",
    ]


def test_speculative_decoding_line_covers_the_interval(caplog):
    """With speculation, each stats line is followed by vLLM's acceptance figures for the proposals verified
    since the previous one (none when nothing was verified)."""
    from dataclasses import replace

    from kvserve.spec_decode.speculator import SpecDecodeStats

    now = [0.0]
    stats = StatLogger(interval_s=10.0, clock=lambda: now[0])
    first = replace(_iteration(1, 0, prefill=0, generated=10, queries=0, hits=0).engine, spec_decode=SpecDecodeStats(10, 30, 20, [9, 7, 4]))
    stats.observe(IterationStats(engine=first, step=StepStats(), generation_tokens=10))
    now[0] = 10.0
    second = replace(first, spec_decode=SpecDecodeStats(30, 90, 50, [25, 17, 8]))
    with caplog.at_level(logging.INFO, logger="kvserve.stats"):
        stats.observe(IterationStats(engine=second, step=StepStats(), generation_tokens=80))
        assert caplog.messages[-1] == ("speculative decoding: mean acceptance length 2.50, acceptance rate 50.0%, "
                                       "per position 0.80, 0.50, 0.20; 60 drafted, 30 accepted")
        now[0] = 20.0
        stats.observe(IterationStats(engine=second, step=StepStats(), generation_tokens=5))
        assert not caplog.messages[-1].startswith("speculative")  # nothing verified in this interval
