"""Prefix caching on vs off with a shared 1,000-token system prompt.

Every request is the same system prompt followed by its own short user turn.
With prefix caching, the KV blocks of the system prompt are computed once and
then found by their chain hash: a new request prefills only its own tokens.

Each mode gets a fresh engine that first serves one request (the system prompt
has been seen before, as in a running service). Then: time to first token of
requests sent one at a time (no queueing), and throughput of a batch sent at
once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from kvserve.bench.ablations.common import (
    AblationContext, AblationResult, RequestTrace, markdown_table, mean, ms, new_figure,
    run_until_done,
)

SYSTEM_PROMPT_LEN = 1000


@dataclass(frozen=True)
class PrefixRun:
    """One mode's numbers: mean TTFT alone and in the batch, batch throughput, cache hits."""

    ttft_alone: float
    ttft_batch: float
    throughput: float
    wall_s: float
    hit_rate: float


def run(ctx: AblationContext) -> AblationResult:
    user_len = ctx.size(32, 8)
    output_len = ctx.size(16, 4)
    num_alone = ctx.size(6, 2)
    num_batch = ctx.size(16, 4)
    system = ctx.prompt(SYSTEM_PROMPT_LEN)
    prompts = [system + ctx.prompt(user_len) for _ in range(1 + num_alone + num_batch)]
    tokens = num_batch * (SYSTEM_PROMPT_LEN + user_len + output_len)
    budget = int(1.2 * tokens * ctx.kv_bytes_per_token())
    results = {}
    for enabled in (False, True):
        engine = ctx.engine(enable_prefix_caching=enabled, kv_cache_memory_bytes=budget,
                            max_num_batched_tokens=2048)
        results[enabled] = _measure(ctx, engine, prompts, num_alone, output_len)
    off, on = results[False], results[True]
    rows = [(label, ms(r.ttft_alone), ms(r.ttft_batch), f"{r.throughput:,.1f}",
             f"{r.wall_s:,.2f}", f"{r.hit_rate:.0%}")
            for label, r in (("off", off), ("on", on))]
    table = markdown_table(
        ["prefix caching", "TTFT alone, mean (ms)", "TTFT in the batch, mean (ms)",
         "batch throughput (output tokens/s)", "batch wall time (s)",
         "prompt tokens from cache"], rows)
    findings = [
        f"Time to first token of a request alone: {ms(on.ttft_alone)} ms with prefix "
        f"caching vs {ms(off.ttft_alone)} ms without "
        f"({off.ttft_alone / on.ttft_alone:,.1f}× faster): only the {user_len} user "
        f"tokens are prefilled instead of {SYSTEM_PROMPT_LEN + user_len}.",
        f"A batch of {num_batch} such requests ran at {on.throughput:,.1f} vs "
        f"{off.throughput:,.1f} output tokens/s "
        f"({on.throughput / off.throughput:,.1f}×); {on.hit_rate:.0%} of its "
        "prompt tokens came from the cache.",
    ]
    figure, (left, right) = new_figure(2, f"Prefix caching, shared {SYSTEM_PROMPT_LEN}-token "
                                          "system prompt")
    labels = ["off", "on"]
    width = 0.38
    left.bar([0 - width / 2, 1 - width / 2], [off.ttft_alone * 1e3, on.ttft_alone * 1e3],
             width, label="alone")
    left.bar([0 + width / 2, 1 + width / 2], [off.ttft_batch * 1e3, on.ttft_batch * 1e3],
             width, label=f"in a batch of {num_batch}")
    left.set_xticks([0, 1], labels)
    left.set(ylabel="mean time to first token (ms)", xlabel="prefix caching", title="TTFT")
    left.legend()
    right.bar(labels, [off.throughput, on.throughput], color=["C1", "C0"])
    right.set(ylabel="output tokens/s", xlabel="prefix caching", title="batch throughput")
    return AblationResult(
        name="prefix_caching", title="Prefix caching on vs off",
        claim="Requests that share a prefix (a system prompt) can share its KV blocks: "
              "prefill only their own tokens, cutting time to first token and raising "
              "throughput.",
        setup=f"Prompts: the same {SYSTEM_PROMPT_LEN}-token random system prompt plus "
              f"{user_len} random user tokens; {output_len} output tokens each. After one "
              f"request that warms the engine, {num_alone} requests are sent one at a time "
              f"(TTFT alone), then {num_batch} at once (throughput, TTFT under load).",
        tables=[table], findings=findings, figure=figure,
        metrics={f"{key}_{label}": getattr(result, key)
                 for label, result in (("off", off), ("on", on))
                 for key in ("ttft_alone", "ttft_batch", "throughput", "hit_rate")},
    )


def _measure(ctx: AblationContext, engine: Any, prompts: list[list[int]], num_alone: int,
             output_len: int) -> PrefixRun:
    ctx.submit(engine, {}, prompts[0], output_len)  # the system prompt has been served before
    run_until_done(engine, {})
    alone: dict[str, RequestTrace] = {}
    with ctx.bar(None, f"prefix caching {'on' if engine.config.enable_prefix_caching else 'off'}"
                 ) as bar:
        for prompt in prompts[1:1 + num_alone]:
            ctx.submit(engine, alone, prompt, output_len)
            run_until_done(engine, alone, bar)
        before = engine.stats()
        batch: dict[str, RequestTrace] = {}
        start = time.perf_counter()
        for prompt in prompts[1 + num_alone:]:
            ctx.submit(engine, batch, prompt, output_len)
        run_until_done(engine, batch, bar)
        wall = time.perf_counter() - start
        after = engine.stats()
    return PrefixRun(
        ttft_alone=mean([t.ttft for t in alone.values()]),
        ttft_batch=mean([t.ttft for t in batch.values()]),
        throughput=len(batch) * output_len / wall,
        wall_s=wall,
        hit_rate=(after.prefix_cache_hits - before.prefix_cache_hits)
        / max(after.prefix_cache_queries - before.prefix_cache_queries, 1),
    )
