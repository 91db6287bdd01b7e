"""ThreadGovernor: how many of its threads a worker uses, chosen by timing its own steps.

On a shared machine another process may keep one of our cores busy. Every parallel
region of a step then waits at its end for the thread that shares that core, and
a step has hundreds of regions: with one of two cores busy, single-stream decode of
the default model fell from 87 to 28 tok/s on two threads, while one thread (which
the OS runs on the free core) kept 75 (docs/PERFORMANCE.md). No fixed thread count
is right for both an idle and a busy machine, so the worker measures: it runs steps
of the same shape (the same number of tokens) with each candidate thread count,
keeps the fastest, and measures again every `reprobe_s` seconds, or at once when
steps of the chosen shape slow down by a third (a neighbour started).

Candidates are the maximum, one fewer (a single busy core), half, and one. A
measurement costs a few steps at a worse setting now and then.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections import defaultdict, deque

import torch

logger = logging.getLogger("kvserve")

_SAMPLES = 2  # steps per candidate and shape before a choice
_SLOWDOWN = 1.33  # a step this much slower than its shape's measured time triggers a new measurement


class ThreadGovernor:
    def __init__(self, max_threads: int, reprobe_s: float = 5.0) -> None:
        if max_threads < 1:
            raise ValueError(f"max_threads must be >= 1, got {max_threads}")
        self.max_threads = max_threads
        self.candidates = sorted({max_threads, max(1, max_threads - 1), max(1, max_threads // 2), 1}, reverse=True)
        self.reprobe_s = reprobe_s
        self.threads = max_threads
        self._probing = len(self.candidates) > 1
        self._samples: dict[tuple[int, int], deque[float]] = defaultdict(lambda: deque(maxlen=_SAMPLES))
        self._chosen_at = 0.0
        self._baseline: tuple[int, float] | None = None  # (shape, seconds) of the last choice
        self._next: int | None = None

    def before_step(self, num_tokens: int) -> None:
        """Set the thread count for a step of `num_tokens` tokens."""
        if self._probing:
            counts = [(len(self._samples[(num_tokens, k)]), -k) for k in self.candidates]
            threads = -min(counts)[1]  # the candidate with the fewest samples at this shape, most threads first
        else:
            threads = self.threads
        self._next = threads
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)

    def after_step(self, num_tokens: int, seconds: float) -> None:
        threads, self._next = self._next, None
        if threads is None:
            return
        now = time.monotonic()
        if not self._probing:
            slowed = self._baseline is not None and self._baseline[0] == num_tokens and seconds > _SLOWDOWN * self._baseline[1]
            if slowed or now - self._chosen_at > self.reprobe_s:
                self._start_probe()
            return
        self._samples[(num_tokens, threads)].append(seconds)
        timed = [self._samples[(num_tokens, k)] for k in self.candidates]
        if all(len(samples) == _SAMPLES for samples in timed):
            medians = {k: statistics.median(samples) for k, samples in zip(self.candidates, timed)}
            best = min(medians, key=medians.get)
            if best != self.threads:
                logger.info("using %d of %d threads: steps of %d tokens took %s", best, self.max_threads, num_tokens,
                            ", ".join(f"{medians[k] * 1e3:.1f} ms on {k}" for k in self.candidates))
            self.threads = best
            self._baseline = (num_tokens, medians[best])
            self._chosen_at = now
            self._probing = False

    def _start_probe(self) -> None:
        self._samples.clear()
        self._probing = len(self.candidates) > 1
