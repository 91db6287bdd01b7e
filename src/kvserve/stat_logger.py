"""What a running server says in its log, as vLLM says it: a line per finished request, and a stats line
every `interval_s` seconds while it is busy.

    request cmpl-3f2a: stop, prompt 12 tokens, output 40 tokens, TTFT 0.081 s, 0.912 s in all
    prompt 512.4 tok/s, generation 88.1 tok/s; running 4, waiting 0 requests; KV cache 12.5% used; prefix cache hit rate 41.0%
    speculative decoding: mean acceptance length 2.97, acceptance rate 65.3%, per position 0.85, 0.66, 0.45; 441 drafted, 288 accepted

(the last only with speculative decoding, for the proposals verified since the previous line).

Like `metrics.py` it is a listener of the engine thread's `IterationStats`, so it
reads nothing across threads. The rates cover the time since the previous stats
line; an idle server (nothing running, waiting or computed since) prints none.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from kvserve.engine.async_engine import FinishedRequest, IterationStats
from kvserve.spec_decode.speculator import SpecDecodeStats

logger = logging.getLogger("kvserve.stats")

DEFAULT_INTERVAL_S = 10.0  # vLLM's VLLM_LOG_STATS_INTERVAL


class StatLogger:
    """`observe` one IterationStats per engine iteration; `log_requests` / `log_stats` turn each kind of line off."""

    def __init__(self, log_requests: bool = True, log_stats: bool = True, interval_s: float = DEFAULT_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.log_requests = log_requests
        self.log_stats = log_stats
        self.interval_s = interval_s
        self._clock = clock
        self._window_start = clock()
        self._prompt_tokens = 0
        self._generation_tokens = 0
        self._prefix_queries_at_start: int | None = None
        self._prefix_hits_at_start = 0
        self._spec_at_start: SpecDecodeStats | None = None

    def observe(self, stats: IterationStats) -> None:
        if self.log_requests:
            for request in stats.finished:
                logger.info("%s", request_line(request))
        if self.log_stats:
            self._count(stats)

    def _count(self, stats: IterationStats) -> None:
        engine = stats.engine
        if stats.step is not None:
            self._prompt_tokens += stats.step.num_prefill_tokens
        self._generation_tokens += stats.generation_tokens
        if engine is None:
            return
        if self._prefix_queries_at_start is None:
            self._prefix_queries_at_start, self._prefix_hits_at_start = engine.prefix_cache_queries, engine.prefix_cache_hits
            self._spec_at_start = engine.spec_decode
        now = self._clock()
        elapsed = now - self._window_start
        if elapsed < self.interval_s:
            return
        busy = engine.num_running or engine.num_waiting or self._prompt_tokens or self._generation_tokens
        if busy:
            queries = engine.prefix_cache_queries - self._prefix_queries_at_start
            hits = engine.prefix_cache_hits - self._prefix_hits_at_start
            logger.info(
                "prompt %.1f tok/s, generation %.1f tok/s; running %d, waiting %d requests; KV cache %.1f%% used; "
                "prefix cache hit rate %s", self._prompt_tokens / elapsed, self._generation_tokens / elapsed,
                engine.num_running, engine.num_waiting, 100 * engine.kv_cache_usage,
                f"{100 * hits / queries:.1f}%" if queries else "-",
            )
            if engine.spec_decode is not None:
                line = spec_decode_line(engine.spec_decode, self._spec_at_start or SpecDecodeStats())
                if line:
                    logger.info("%s", line)
        self._window_start = now
        self._spec_at_start = engine.spec_decode
        self._prompt_tokens = self._generation_tokens = 0
        self._prefix_queries_at_start, self._prefix_hits_at_start = engine.prefix_cache_queries, engine.prefix_cache_hits


def spec_decode_line(now: SpecDecodeStats, before: SpecDecodeStats) -> str | None:
    """What speculative decoding did between two cumulative readings (vLLM's SpecDecoding metrics line); None
    when nothing was verified."""
    interval = now.since(before)
    drafts, drafted, accepted = interval.num_drafts, interval.num_draft_tokens, interval.num_accepted_tokens
    if not drafts:
        return None
    per_position = [n / drafts for n in interval.accepted_per_position]
    return (f"speculative decoding: mean acceptance length {1 + accepted / drafts:.2f}, acceptance rate "
            f"{100 * accepted / drafted:.1f}%, per position {', '.join(f'{r:.2f}' for r in per_position) or '-'}; "
            f"{drafted} drafted, {accepted} accepted")


def request_line(request: FinishedRequest) -> str:
    """The log line of one finished request."""
    ttft = "no token" if request.time_to_first_token is None else f"TTFT {request.time_to_first_token:.3f} s"
    return (f"request {request.request_id}: {request.finish_reason}, prompt {request.prompt_tokens} tokens, "
            f"output {request.output_tokens} tokens, {ttft}, {request.e2e_seconds:.3f} s in all")
