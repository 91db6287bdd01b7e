"""Chunked prefill on vs off: what a long prompt arriving does to the running decodes.

A few requests are decoding when a long prompt arrives. Without chunked prefill
the whole prompt is prefilled in one step, and every running decode waits for
that step: one long gap between two of their tokens. With chunked prefill
(SplitFuse) the prompt is split over several steps under a token budget, each
shared with the decodes, so their inter-token latency (ITL) stays bounded, at
the cost of a later first token for the long prompt.

Without chunking the engine needs ``max_num_batched_tokens >= max_model_len``;
with it the budget is small. ITLs are taken from the decodes' token times
between the long prompt's arrival and its first token.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

from kvserve.bench.ablations.common import (
    AblationContext, AblationResult, RequestTrace, engine_step, markdown_table, mean, ms,
    new_figure, percentile, run_until_done,
)

DECODE_PROMPT_LEN = 16
WARM_DECODE_STEPS = 5


@dataclass(frozen=True)
class ChunkedRun:
    """ITLs of the decodes while the long prompt was being prefilled, and its own TTFT."""

    itls: list[tuple[float, float]]  # (seconds since the long prompt arrived, gap)
    steady_itl: float
    long_ttft: float

    @property
    def gaps(self) -> list[float]:
        return [gap for _, gap in self.itls]


def run(ctx: AblationContext) -> AblationResult:
    num_decodes = ctx.size(8, 4)
    long_len = ctx.size(3000, 1000)
    chunk_budget = ctx.size(256, 64)
    max_len = -(-(long_len + num_decodes + 64) // 256) * 256
    decode_tokens = WARM_DECODE_STEPS + -(-long_len // (chunk_budget - num_decodes)) + 10
    decode_prompts = [ctx.prompt(DECODE_PROMPT_LEN) for _ in range(num_decodes)]
    long_prompt = ctx.prompt(long_len)
    budget = int(1.2 * (long_len + num_decodes * (DECODE_PROMPT_LEN + decode_tokens) + 64)
                 * ctx.kv_bytes_per_token())
    runs = {}
    for chunked in (False, True):
        engine = ctx.engine(enable_chunked_prefill=chunked, max_model_len=max_len,
                            max_num_batched_tokens=chunk_budget if chunked else max_len,
                            kv_cache_memory_bytes=budget)
        runs[chunked] = _measure(ctx, engine, decode_prompts, long_prompt, decode_tokens)
    off, on = runs[False], runs[True]
    rows = [(label, ms(r.steady_itl), ms(mean(r.gaps)), ms(percentile(r.gaps, 99)),
             ms(max(r.gaps)), ms(r.long_ttft))
            for label, r in ((f"off (budget {max_len})", off),
                             (f"on (budget {chunk_budget})", on))]
    table = markdown_table(
        ["chunked prefill", "decode ITL before, median (ms)", "ITL during prefill, mean (ms)",
         "ITL p99 (ms)", "ITL max (ms)", "long prompt TTFT (ms)"], rows)
    findings = [
        f"While a {long_len:,}-token prompt was prefilled, the p99 inter-token latency of "
        f"{num_decodes} running decodes was {ms(percentile(on.gaps, 99))} ms with chunked "
        f"prefill vs {ms(percentile(off.gaps, 99))} ms without "
        f"({percentile(off.gaps, 99) / percentile(on.gaps, 99):,.1f}× lower).",
        f"The price: the long prompt's first token came after {ms(on.long_ttft)} ms instead "
        f"of {ms(off.long_ttft)} ms.",
    ]
    figure, (left, right) = new_figure(2, f"Chunked prefill: {num_decodes} decodes, a "
                                          f"{long_len:,}-token prompt arrives")
    for index, (label, result) in enumerate((("off", off), ("on", on))):
        left.scatter([t * 1e3 for t, _ in result.itls], [g * 1e3 for _, g in result.itls],
                     s=10, color=f"C{1 - index}", label=f"chunked prefill {label}")
        left.axvline(result.long_ttft * 1e3, color=f"C{1 - index}", lw=0.8, ls="--")
    left.set(xlabel="time since the long prompt arrived (ms)", ylabel="decode ITL (ms)",
             title="inter-token latency (dashed: long prompt's first token)")
    left.legend()
    right.bar(["off", "on"], [percentile(off.gaps, 99) * 1e3, percentile(on.gaps, 99) * 1e3],
              color=["C1", "C0"])
    right.set(xlabel="chunked prefill", ylabel="ms", title="decode ITL p99 during the prefill")
    return AblationResult(
        name="chunked_prefill", title="Chunked prefill on vs off",
        claim="Prefilling a long prompt in one step stalls every running decode for that "
              "step; splitting it into chunks that share steps with the decodes keeps their "
              "inter-token latency low.",
        setup=f"{num_decodes} requests with {DECODE_PROMPT_LEN}-token prompts decode for "
              f"{WARM_DECODE_STEPS} steps, then a {long_len:,}-token prompt arrives. "
              f"Off: max_num_batched_tokens = max_model_len = {max_len}; on: a budget of "
              f"{chunk_budget} tokens per step. ITLs are the gaps between the decodes' tokens "
              "from the long prompt's arrival to its first token.",
        tables=[table], findings=findings, figure=figure,
        metrics={f"{key}_{label}": value
                 for label, result in (("off", off), ("on", on))
                 for key, value in (("itl_p99_s", percentile(result.gaps, 99)),
                                    ("itl_max_s", max(result.gaps)),
                                    ("long_ttft_s", result.long_ttft))},
    )


def _measure(ctx: AblationContext, engine: Any, decode_prompts: list[list[int]],
             long_prompt: list[int], decode_tokens: int) -> ChunkedRun:
    decodes: dict[str, RequestTrace] = {}
    for prompt in decode_prompts:
        ctx.submit(engine, decodes, prompt, decode_tokens)
    label = "chunked prefill " + ("on" if engine.config.enable_chunked_prefill else "off")
    with ctx.bar(None, label) as bar:
        while min(len(t.token_times) for t in decodes.values()) < WARM_DECODE_STEPS:
            engine_step(engine, decodes)
            bar.update(1)
        long_trace: dict[str, RequestTrace] = {}
        ctx.submit(engine, long_trace, long_prompt, 2)
        traces = {**decodes, **long_trace}
        run_until_done(engine, traces, bar)
    arrival = next(iter(long_trace.values())).arrival
    first_token = next(iter(long_trace.values())).token_times[0]
    during, before = [], []
    for trace in decodes.values():
        for end, gap in trace.inter_token_latencies:
            if arrival <= end <= first_token:
                during.append((end - arrival, gap))
            elif end < arrival:
                before.append(gap)
    return ChunkedRun(itls=during, steady_itl=statistics.median(before),
                      long_ttft=first_token - arrival)
