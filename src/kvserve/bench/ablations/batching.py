"""Static vs continuous batching on a workload whose output lengths vary.

Static batching is emulated with the same engine: admit ``B`` requests, give
every one of them the longest ``max_tokens`` of the batch (a padded batch
computes every row until the longest is done), and admit the next batch only
when all have finished; each request's result is delivered when its batch
completes. Continuous batching is the engine as it is: all requests queued, at
most ``B`` running, a finished request's slot refilled at the next step.
Prompts all have the same length, so prompt padding costs nothing here; only
the output lengths differ.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from kvserve.bench.ablations.common import (
    AblationContext, AblationResult, RequestTrace, markdown_table, mean, ms, new_figure,
    percentile, run_until_done,
)

PROMPT_LEN = 32


@dataclass(frozen=True)
class BatchingRun:
    """Wall time of the whole workload, each request's latency, and tokens computed."""

    wall_s: float
    latencies: list[float]
    computed_tokens: int


def run(ctx: AblationContext) -> AblationResult:
    num_requests = ctx.size(32, 8)
    batch = ctx.size(8, 4)
    low, high = ctx.size((8, 192), (2, 16))
    output_lens = [ctx.rng.randint(low, high) for _ in range(num_requests)]
    prompts = [ctx.prompt(PROMPT_LEN) for _ in range(num_requests)]
    engine = ctx.engine(max_num_seqs=batch)

    static = _static(ctx, engine, prompts, output_lens, batch)
    continuous = _continuous(ctx, engine, prompts, output_lens)
    useful = sum(output_lens)
    rows = []
    for label, result in (("static", static), ("continuous", continuous)):
        rows.append((label, f"{useful / result.wall_s:,.1f}", f"{result.wall_s:,.2f}",
                     ms(mean(result.latencies)), ms(percentile(result.latencies, 99)),
                     f"{result.computed_tokens:,}",
                     f"{1 - useful / result.computed_tokens:.0%}"))
    table = markdown_table(
        ["batching", "throughput (useful tokens/s)", "wall time (s)", "mean latency (ms)",
         "p99 latency (ms)", "tokens computed", "wasted"], rows)
    findings = [
        f"Continuous batching finished the same {num_requests} requests "
        f"{static.wall_s / continuous.wall_s:,.2f}× faster ({useful / continuous.wall_s:,.1f} "
        f"vs {useful / static.wall_s:,.1f} useful tokens/s).",
        f"Mean latency {ms(mean(continuous.latencies))} ms vs {ms(mean(static.latencies))} ms; "
        f"p99 {ms(percentile(continuous.latencies, 99))} ms vs "
        f"{ms(percentile(static.latencies, 99))} ms (continuous vs static).",
        f"Static batching computed {static.computed_tokens:,} tokens for {useful:,} useful "
        "ones: every row of a batch runs until the longest is done.",
    ]
    figure, (left, right) = new_figure(2, f"Static vs continuous batching (batch {batch})")
    labels = ["static", "continuous"]
    left.bar(labels, [useful / static.wall_s, useful / continuous.wall_s], color=["C1", "C0"])
    left.set(ylabel="useful tokens/s", title="throughput")
    for index, (name, result) in enumerate((("static", static), ("continuous", continuous))):
        latencies = sorted(result.latencies)
        right.plot(latencies, [(i + 1) / len(latencies) for i in range(len(latencies))],
                   color=f"C{1 - index}", label=name, drawstyle="steps-post")
    right.set(xlabel="request latency (s)", ylabel="fraction of requests", title="latency CDF")
    right.legend()
    return AblationResult(
        name="batching", title="Static vs continuous batching",
        claim="Static batching pads every request to the longest in its batch and waits for "
              "the slowest before starting the next batch; continuous (iteration-level) "
              "batching refills a slot as soon as a request finishes: higher throughput and "
              "lower latency when output lengths vary.",
        setup=f"{num_requests} requests, {PROMPT_LEN}-token random prompts, output lengths "
              f"uniform in [{low}, {high}] (seeded), all queued at time 0, at most {batch} "
              "running. Latency: from time 0 to the request's last token (static: to the end "
              "of its batch).",
        tables=[table], findings=findings, figure=figure,
        metrics={f"{label}_{key}": value
                 for label, result in (("static", static), ("continuous", continuous))
                 for key, value in (("throughput", useful / result.wall_s),
                                    ("mean_latency_s", mean(result.latencies)),
                                    ("p99_latency_s", percentile(result.latencies, 99)),
                                    ("computed_tokens", result.computed_tokens))}
        | {"useful_tokens": useful},
    )


def _static(ctx: AblationContext, engine: Any, prompts: list[list[int]], output_lens: list[int],
            batch: int) -> BatchingRun:
    """Padded batches, each admitted when the previous one has finished."""
    start = time.perf_counter()
    latencies: list[float] = []
    generated = 0
    with ctx.bar(len(prompts), "static batching") as bar:
        for first in range(0, len(prompts), batch):
            group = range(first, min(first + batch, len(prompts)))
            longest = max(output_lens[i] for i in group)
            traces: dict[str, RequestTrace] = {}
            for i in group:
                ctx.submit(engine, traces, prompts[i], longest)
            run_until_done(engine, traces)
            done = time.perf_counter()
            latencies += [done - start] * len(group)
            generated += longest * len(group)
            bar.update(len(group))
    return BatchingRun(time.perf_counter() - start, latencies, generated)


def _continuous(ctx: AblationContext, engine: Any, prompts: list[list[int]],
                output_lens: list[int]) -> BatchingRun:
    """All requests queued at once; the engine refills finished slots every step."""
    start = time.perf_counter()
    traces: dict[str, RequestTrace] = {}
    for prompt, length in zip(prompts, output_lens):
        ctx.submit(engine, traces, prompt, length)
    with ctx.bar(None, "continuous batching") as bar:
        run_until_done(engine, traces, bar)
    latencies = [trace.token_times[-1] - start for trace in traces.values()]
    return BatchingRun(time.perf_counter() - start, latencies, sum(output_lens))
