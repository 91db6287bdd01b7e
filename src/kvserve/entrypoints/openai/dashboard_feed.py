"""DashboardFeed: what the live dashboard shows, gathered from the engine thread's iterations.

Two sides, one writer each:

- the engine thread calls `observe(stats)` once per iteration (it is one of the async engine's
  stats listeners): it appends a small record to a bounded queue and keeps the newest
  `EngineSnapshot` — O(1), and nothing else, so an open dashboard costs the engine next to nothing;
- the event loop calls `frame()` a few times a second per connected dashboard: it drains the
  queue into its own aggregates (the last steps, per-second counts and latency histograms of the
  last minute) and returns one JSON-ready dict.

A frame is the whole picture, not a delta, so a dashboard that connects late or drops a frame
still draws the truth. Latencies are histogrammed on log-spaced edges per second as they are
drained (a few values at a time), so a frame sums at most 60 small count arrays.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kvserve.engine.async_engine import IterationStats
from kvserve.engine.llm_engine import StepStats
from kvserve.engine.snapshot import EngineSnapshot, PoolSnapshot
from kvserve.estimate.step_roofline import StepRoofline

WINDOW_S = 60  # the histograms and timelines cover the last minute
STEP_HISTORY = 240  # steps kept for the step-composition and roofline charts
_PENDING = 8192  # iterations the engine thread may queue between two frames (older ones are dropped)
# Latency histogram edges, seconds: 4 per decade from 100 us to 100 s (values outside land in the end bins).
LATENCY_EDGES = np.geomspace(1e-4, 1e2, 25)
_STATE_CHARS = np.uint8(ord("0"))


@dataclass(frozen=True)
class _Iteration:
    """What the engine thread hands over per iteration (plain values; the lists are the iteration's own)."""

    time: float
    step: StepStats | None
    generation_tokens: int
    prompt_tokens: int
    ttft: list[float]
    itl: list[float]
    kv_cache_usage: float
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int
    num_running: int
    num_waiting: int


@dataclass
class _Second:
    """One second of the timeline."""

    generation_tokens: int = 0
    prompt_tokens: int = 0
    kv_cache_usage: float = 0.0
    prefix_cache_queries: int = 0  # cumulative, at the second's last iteration
    prefix_cache_hits: int = 0
    ttft: np.ndarray = field(default_factory=lambda: np.zeros(len(LATENCY_EDGES) - 1, dtype=np.int64))
    itl: np.ndarray = field(default_factory=lambda: np.zeros(len(LATENCY_EDGES) - 1, dtype=np.int64))


def _histogram(values: list[float]) -> np.ndarray:
    return np.histogram(np.clip(values, LATENCY_EDGES[0], LATENCY_EDGES[-1]), LATENCY_EDGES)[0]


class DashboardFeed:
    def __init__(self, model_name: str, num_blocks: int, block_size: int, max_num_batched_tokens: int, max_num_seqs: int) -> None:
        self.header = {
            "model": model_name, "num_blocks": num_blocks, "block_size": block_size,
            "max_num_batched_tokens": max_num_batched_tokens, "max_num_seqs": max_num_seqs,
        }
        self.roofline: StepRoofline | None = None  # set by the server once the machine's floors are known
        self._lock = threading.Lock()
        self._pending: deque[_Iteration] = deque(maxlen=_PENDING)
        self._snapshot: EngineSnapshot | None = None
        # the event loop's own aggregates
        self._steps: deque[tuple[float, StepStats]] = deque(maxlen=STEP_HISTORY)
        self._seconds: dict[int, _Second] = {}
        self._last: _Iteration | None = None

    # ---- engine thread ------------------------------------------------------------------

    def observe(self, stats: IterationStats) -> None:
        """Queue what one iteration did (the engine thread's side: O(1))."""
        engine = stats.engine
        if engine is None:
            return
        item = _Iteration(
            stats.time, stats.step, stats.generation_tokens, stats.prompt_tokens, stats.time_to_first_token,
            stats.inter_token_latency, engine.kv_cache_usage, engine.prefix_cache_queries, engine.prefix_cache_hits,
            engine.num_preemptions, engine.num_running, engine.num_waiting,
        )
        with self._lock:
            self._pending.append(item)
            if stats.snapshot is not None:
                self._snapshot = stats.snapshot

    # ---- event loop ---------------------------------------------------------------------

    def frame(self, now: float | None = None) -> dict[str, Any]:
        """The dashboard's whole picture now, as JSON-ready data."""
        now = time.monotonic() if now is None else now
        with self._lock:
            pending = list(self._pending)
            self._pending.clear()
            snapshot = self._snapshot
        for item in pending:
            self._add(item)
        oldest = int(now) - WINDOW_S
        for second in [s for s in self._seconds if s <= oldest]:
            del self._seconds[second]
        last = self._last
        seconds = sorted(self._seconds)
        ttft = sum((self._seconds[s].ttft for s in seconds), np.zeros(len(LATENCY_EDGES) - 1, dtype=np.int64))
        itl = sum((self._seconds[s].itl for s in seconds), np.zeros(len(LATENCY_EDGES) - 1, dtype=np.int64))
        return {
            **self.header,
            "pools": [] if snapshot is None else [_pool(pool) for pool in snapshot.pools],
            "running": 0 if last is None else last.num_running,
            "waiting": 0 if last is None else last.num_waiting,
            "preemptions": 0 if last is None else last.num_preemptions,
            "prefix_cache": {"queries": 0 if last is None else last.prefix_cache_queries,
                             "hits": 0 if last is None else last.prefix_cache_hits},
            "steps": [self._step_row(now, t, step) for t, step in self._steps],
            "timeline": [self._timeline_row(now, s) for s in seconds],
            "latency_edges": LATENCY_EDGES.tolist(),
            "ttft_counts": ttft.tolist(),
            "itl_counts": itl.tolist(),
            "roofline": None if self.roofline is None else self.roofline.roof(),
        }

    def _add(self, item: _Iteration) -> None:
        second = self._seconds.setdefault(int(item.time), _Second())
        second.generation_tokens += item.generation_tokens
        second.prompt_tokens += item.prompt_tokens
        second.kv_cache_usage = item.kv_cache_usage
        second.prefix_cache_queries = item.prefix_cache_queries
        second.prefix_cache_hits = item.prefix_cache_hits
        if item.ttft:
            second.ttft += _histogram(item.ttft)
        if item.itl:
            second.itl += _histogram(item.itl)
        self._last = item
        step = item.step
        if step is not None and (step.num_tokens or step.num_preempted):
            self._steps.append((item.time, step))

    def _step_row(self, now: float, t: float, step: StepStats) -> list[float | None]:
        """[age s, decode tokens, prefill tokens, sequences, preempted, ms, FLOPs, bytes] (no FLOPs or bytes
        until the machine's roofline is known)."""
        roofline = self.roofline
        flops = None if roofline is None else roofline.step_flops(step.num_tokens, step.num_attention_pairs)
        nbytes = None if roofline is None else roofline.step_bytes(step.num_context_tokens)
        return [round(now - t, 3), step.num_decode_tokens, step.num_prefill_tokens, step.num_seqs, step.num_preempted,
                round(step.duration_s * 1e3, 3), flops, nbytes]

    def _timeline_row(self, now: float, second: int) -> list[float]:
        s = self._seconds[second]
        return [round(now - second, 3), s.generation_tokens, s.prompt_tokens, round(s.kv_cache_usage, 4),
                s.prefix_cache_queries, s.prefix_cache_hits]


def _pool(pool: PoolSnapshot) -> dict[str, Any]:
    """A pool as the page draws it: block states as one string of digits (`snapshot.FREE` .. `SHARED`); a block's
    holders are the sequences whose tables list it."""
    states = (pool.blocks.states() + _STATE_CHARS).tobytes().decode("ascii")
    return {
        "block_size": pool.block_size,
        "states": states,
        "waiting": pool.num_waiting,
        "sequences": [
            {"seq_id": s.seq_id, "request_id": s.request_id, "block_table": s.block_table,
             "computed": s.num_computed_tokens, "tokens": s.num_tokens, "prompt_tokens": s.num_prompt_tokens,
             "cached_tokens": s.num_cached_tokens, "preemptions": s.num_preemptions}
            for s in pool.sequences
        ],
    }

