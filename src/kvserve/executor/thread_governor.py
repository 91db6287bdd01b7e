"""ThreadGovernor: how many of its threads a worker uses, chosen by timing its own steps.

On a shared machine another process may keep one of our cores busy. Every parallel
region of a step then waits at its end for the thread that shares that core, and
a step has hundreds of regions: with one of two cores busy, single-stream decode of
the default model fell from 87 to 28 tok/s on two threads, while one thread (which
the OS runs on the free core) kept 75 (docs/PERFORMANCE.md). No fixed thread count
is right for both an idle and a busy machine, so the worker measures.

A measurement compares like with like: it takes the shape (token count) of the
step that starts it as its anchor, and only steps of that shape try the other
thread counts; every other step runs on the current choice. After `_SAMPLES` steps
of the anchor shape per candidate it keeps the fastest. If the anchor does not come
back within `_PATIENCE` steps (prefill chunks of ever-changing sizes), the attempt
is dropped and the next step anchors a new one, so a workload whose shapes never
repeat runs on the current choice all along. A new measurement starts every
`reprobe_s` seconds, or at once when a step of the chosen shape is a third slower
than measured (a neighbour started). Candidates: the maximum, one fewer (a single
busy core), half, and one.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections import defaultdict

import torch

logger = logging.getLogger("kvserve")

_SAMPLES = 2  # steps of the anchor shape per candidate before a choice
_PATIENCE = 64  # steps a measurement waits for its anchor shape to come back
_SLOWDOWN = 1.33  # a step this much slower than its shape's measured time triggers a new measurement


class ThreadGovernor:
    def __init__(self, max_threads: int, reprobe_s: float = 5.0) -> None:
        if max_threads < 1:
            raise ValueError(f"max_threads must be >= 1, got {max_threads}")
        self.max_threads = max_threads
        self.candidates = sorted({max_threads, max(1, max_threads - 1), max(1, max_threads // 2), 1}, reverse=True)
        self.reprobe_s = reprobe_s
        self.threads = max_threads
        self.measuring = len(self.candidates) > 1
        self._anchor: int | None = None  # the shape being measured (set by the measurement's first step)
        self._waited = 0  # steps since the measurement started
        self._samples: dict[int, list[float]] = defaultdict(list)  # candidate -> anchor-shaped step times
        self._chosen_at = time.monotonic()
        self._baseline: tuple[int, float] | None = None  # (shape, seconds) of the last choice
        self._next = max_threads

    def before_step(self, num_tokens: int) -> None:
        """Set the thread count for a step of `num_tokens` tokens."""
        threads = self.threads
        if self.measuring and self._anchor == num_tokens:
            threads = min(self.candidates, key=lambda k: (len(self._samples[k]), -k))  # fewest samples, most threads first
        self._next = threads
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)

    def after_step(self, num_tokens: int, seconds: float) -> None:
        now = time.monotonic()
        if not self.measuring:
            slowed = self._baseline is not None and self._baseline[0] == num_tokens and seconds > _SLOWDOWN * self._baseline[1]
            if slowed or now - self._chosen_at > self.reprobe_s:
                self._start()
            return
        if self._anchor is None:
            self._anchor = num_tokens
        if num_tokens == self._anchor:
            self._samples[self._next].append(seconds)
        self._waited += 1
        if all(len(self._samples[k]) >= _SAMPLES for k in self.candidates):
            self._choose(now)
        elif self._waited >= _PATIENCE:
            self._start()  # the anchor shape did not come back: anchor the next step instead

    def _choose(self, now: float) -> None:
        medians = {k: statistics.median(self._samples[k]) for k in self.candidates}
        best = min(medians, key=medians.get)
        if best != self.threads:
            logger.info("using %d of %d threads: steps of %d tokens took %s", best, self.max_threads, self._anchor,
                        ", ".join(f"{medians[k] * 1e3:.1f} ms on {k}" for k in self.candidates))
        self.threads = best
        self._baseline = (self._anchor, medians[best])
        self._chosen_at = now
        self.measuring = False

    def _start(self) -> None:
        self.measuring = len(self.candidates) > 1
        self._anchor = None
        self._waited = 0
        self._samples.clear()
