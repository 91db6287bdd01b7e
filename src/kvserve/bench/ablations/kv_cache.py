"""KV cache on vs off: the cost of each new token with and without cached keys and values.

With the cache, each step runs the model on one new token and reads the cached
K/V of the others: the per-token time grows only through attention reads, and
the total grows about linearly with the number of tokens. Without it ("off", as
in the GPT-2 example of the write-ups), each step runs the model over the whole
sequence again: the per-token time grows linearly with the length, the total
quadratically.

"Off" goes through the engine's public API: every step is a new request whose
prompt is the whole sequence so far, with ``max_tokens=1`` and prefix caching
off, so the model recomputes every position into a fresh cache and samples one
token from the last position's logits. Both runs decode greedily, so they must
produce the same tokens.
"""

from __future__ import annotations

import itertools
import math
import statistics

from kvserve.bench.ablations.common import (
    AblationContext, AblationResult, RequestTrace, engine_step, markdown_table, ms, new_figure,
    run_until_done,
)

PROMPT_LEN = 16


def run(ctx: AblationContext) -> AblationResult:
    max_len = ctx.size(512, 96)
    new_tokens = max_len - PROMPT_LEN
    engine = ctx.engine(max_num_batched_tokens=max(2048, max_len))
    prompt = ctx.prompt(PROMPT_LEN)

    cached_times: list[float] = []
    traces: dict[str, RequestTrace] = {}
    ctx.submit(engine, traces, prompt, new_tokens)
    with ctx.bar(new_tokens, "kv cache on") as bar:
        run_until_done(engine, traces, bar,
                       on_step=lambda e: cached_times.append(e.last_step.duration_s))
    cached_tokens = next(iter(traces.values())).token_ids

    recompute_times: list[float] = []
    sequence = list(prompt)
    with ctx.bar(new_tokens, "kv cache off (recompute)") as bar:
        for _ in range(new_tokens):
            step_traces: dict[str, RequestTrace] = {}
            ctx.submit(engine, step_traces, sequence, 1)
            engine_step(engine, step_traces)
            if engine.has_unfinished_requests():
                raise RuntimeError("a recompute step did not finish in one engine step")
            recompute_times.append(engine.last_step.duration_s)
            sequence.append(next(iter(step_traces.values())).token_ids[-1])
            bar.update(1)
    recomputed_tokens = sequence[PROMPT_LEN:]

    # Step k produces token k+1 from a sequence of PROMPT_LEN + k tokens.
    lengths = [PROMPT_LEN + k for k in range(new_tokens)]
    return _result(ctx, lengths, cached_times, recompute_times,
                   cached_tokens == recomputed_tokens, max_len)


def _windowed(lengths: list[int], times: list[float], at: int, half_width: int = 4) -> float:
    """Median step time over sequence lengths within ``half_width`` of ``at`` (damps noise)."""
    window = [t for n, t in zip(lengths, times) if abs(n - at) <= half_width]
    return statistics.median(window)


def _growth_exponent(times: list[float]) -> float:
    """``log2(total(N) / total(N/2))``: 1 for a linear total cost, 2 for a quadratic one."""
    half = len(times) // 2
    return math.log2(sum(times) / sum(times[:half]))


def _result(ctx: AblationContext, lengths: list[int], cached: list[float],
            recompute: list[float], same_tokens: bool, max_len: int) -> AblationResult:
    marks = [n for n in (16, 32, 64, 128, 256, 512, 1024) if n <= max_len]
    marks = [min(n, lengths[-1]) for n in marks]
    rows = []
    for n in marks:
        upto = lengths.index(n) + 1
        on, off = _windowed(lengths, cached, n), _windowed(lengths, recompute, n)
        rows.append((n, ms(on), ms(off), f"{off / on:,.1f}×",
                     f"{sum(cached[:upto]):,.2f}", f"{sum(recompute[:upto]):,.2f}"))
    table = markdown_table(
        ["sequence length", "ms/token, KV cache", "ms/token, recompute", "recompute / cache",
         "total s, KV cache", "total s, recompute"], rows)
    n_new = len(lengths)
    findings = [
        f"Generating {n_new} tokens after a {PROMPT_LEN}-token prompt took "
        f"{sum(cached):,.2f} s with the KV cache and {sum(recompute):,.2f} s recomputing "
        f"({sum(recompute) / sum(cached):,.1f}× slower).",
        f"Doubling the tokens generated ({n_new // 2} → {n_new}) multiplied the total time by "
        f"2^{_growth_exponent(cached):.2f} with the cache and 2^{_growth_exponent(recompute):.2f} "
        "recomputing (2^1: linear, 2^2: quadratic; fixed per-step overheads pull both "
        "towards 1 at short lengths).",
        f"The last token cost {ms(_windowed(lengths, cached, lengths[-1]))} ms with the cache "
        f"and {ms(_windowed(lengths, recompute, lengths[-1]))} ms recomputing.",
        "Both runs produced the same tokens (greedy): "
        + ("yes." if same_tokens else "NO — the two paths disagree."),
    ]
    figure, (left, right) = new_figure(2, "KV cache on vs off (recompute every step)")
    left.plot(lengths, [t * 1e3 for t in cached], label="KV cache", lw=1)
    left.plot(lengths, [t * 1e3 for t in recompute], label="recompute", lw=1)
    left.set(xlabel="sequence length (tokens)", ylabel="time per generated token (ms)")
    left.legend()
    cumulative_on = list(itertools.accumulate(cached))
    cumulative_off = list(itertools.accumulate(recompute))
    generated = list(range(1, n_new + 1))
    right.plot(generated, cumulative_on, label="KV cache (≈ linear)")
    right.plot(generated, cumulative_off, label="recompute (≈ quadratic)")
    right.set(xlabel="tokens generated", ylabel="total time (s)")
    right.legend()
    return AblationResult(
        name="kv_cache", title="KV cache on vs off",
        claim="Without a KV cache every step reprocesses the whole sequence: time per token "
              "grows linearly with the length and the total cost quadratically; with it, "
              "each step processes one token.",
        setup=f"One greedy request, {PROMPT_LEN}-token random prompt, generated to "
              f"{max_len} tokens. Off: each step is a fresh request over the whole sequence "
              "(prefix caching off, `max_tokens=1`). Per-token times are engine step times, "
              "medians over ±4 tokens in the table.",
        tables=[table], findings=findings, figure=figure,
        metrics={"total_s_kv_cache": sum(cached), "total_s_recompute": sum(recompute),
                 "growth_exponent_kv_cache": _growth_exponent(cached),
                 "growth_exponent_recompute": _growth_exponent(recompute),
                 "same_tokens": float(same_tokens)},
    )

