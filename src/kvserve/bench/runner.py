"""What every engine under benchmark provides, and what its runs return.

kvserve and each peer (transformers, llama.cpp) are wrapped in a runner with the
same two measurements, so `kvserve bench throughput` and `kvserve bench latency`
treat them alike: ``generate`` a whole workload (timed from the first request to
the last token), and ``stream`` one prompt (a timestamp per generated token).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any, Protocol

from kvserve.bench.workload import Workload


@dataclass
class BatchRun:
    """An engine generating a whole workload: wall time and the tokens of each request, in order."""

    elapsed_s: float
    output_token_ids: list[list[int]]


@dataclass
class StreamTiming:
    """One request on its own: when it was submitted and when each generated token arrived."""

    start: float
    token_times: list[float] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)

    @property
    def ttft_s(self) -> float:
        return self.token_times[0] - self.start

    @property
    def decode_step_s(self) -> float:
        """Mean time per token after the first (the prefill produces the first)."""
        if len(self.token_times) < 2:
            raise ValueError("decode time needs at least 2 generated tokens")
        return (self.token_times[-1] - self.token_times[0]) / (len(self.token_times) - 1)


class Runner(Protocol):
    name: str

    def settings(self) -> dict[str, Any]:
        """How the engine was run (precision, batching, weights), for the report."""

    def generate(self, workload: Workload, progress: bool) -> BatchRun:
        """Generate every request of ``workload`` greedily, exactly ``output_len`` tokens each."""

    def stream(self, prompt_token_ids: list[int], max_tokens: int) -> StreamTiming:
        """Generate ``max_tokens`` greedy tokens for one prompt, timing each token."""


def first_tokens_agreement(reference: list[list[int]], other: list[list[int]], num_tokens: int = 8) -> float:
    """Share of requests whose first ``num_tokens`` generated tokens are equal in both runs.

    A sanity check that two engines ran the same weights on the same prompts. It is
    not exact equality: bf16 rounding legitimately flips near-ties after a few tokens.
    """
    if not reference:
        return 1.0
    same = sum(a[:num_tokens] == b[:num_tokens] for a, b in zip(reference, other))
    return same / len(reference)


def median(values: list[float]) -> float:
    return statistics.median(values)
