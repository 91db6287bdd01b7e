"""Bounded memory, shown: one request streams N tokens through attention sinks and a window, and neither
its KV blocks nor the process's RSS grow with N.

    python benchmarks/streaming_memory.py                      # stories260K, 100,000 tokens, W = 1024, S = 4
    python benchmarks/streaming_memory.py --tokens 2000 --window 128 --json

It steps one LLMEngine by hand and samples, every `--every` tokens, the blocks the request holds (from
the block manager, through `stats()`) and VmRSS. It exits 1 when a block count after the window filled
differs from the sink blocks plus the window's (which straddles W / block_size or one more), when any
block is still held after the request ends, or when RSS grew by more than `--max-rss-growth-mib`
between the window filling and the end. tests/test_streaming_memory.py runs it (small in the default
suite, 100k tokens marked slow).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from kvserve import SamplingParams
from kvserve.config import EngineConfig
from kvserve.engine.llm_engine import LLMEngine

STORIES = Path(__file__).resolve().parents[2] / "shared" / "models" / "stories260K"


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(STORIES))
    parser.add_argument("--tokens", type=int, default=100_000)
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--sinks", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--every", type=int, default=500, help="tokens between samples")
    parser.add_argument("--max-rss-growth-mib", type=float, default=64.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    engine = LLMEngine(EngineConfig(
        model=args.model, dtype="float32", block_size=args.block_size, sliding_window=args.window,
        attention_sinks=args.sinks, kv_cache_memory_bytes=16 << 20, num_threads=1, adaptive_threads=False,
    ))
    free = engine.stats().num_free_blocks
    engine.add_request("stream", "Once upon a time", SamplingParams(temperature=0.8, seed=0, max_tokens=args.tokens, ignore_eos=True))
    samples: list[dict] = []
    generated, started = 0, time.perf_counter()
    output = None
    while engine.has_unfinished_requests():
        for output in engine.step():
            generated = len(output.outputs[0].token_ids)
        stats = engine.stats()
        if stats.running and (generated % args.every == 0 or not samples):
            samples.append(dict(tokens=generated, blocks=stats.running[0].num_blocks, rss_mib=round(rss_mib(), 1),
                                seconds=round(time.perf_counter() - started, 1)))
    bs = args.block_size
    sink_blocks = -(-args.sinks // bs)
    steady = [s for s in samples if s["tokens"] >= args.sinks + args.window + bs]
    allowed = {sink_blocks + args.window // bs, sink_blocks + -(-(args.window + bs - 1) // bs)}
    rss_growth = steady[-1]["rss_mib"] - steady[0]["rss_mib"] if steady else 0.0
    result = dict(
        tokens=generated, finish_reason=output.outputs[0].finish_reason if output else None,
        seconds=round(time.perf_counter() - started, 1), blocks_allowed=sorted(allowed),
        blocks_seen=sorted({s["blocks"] for s in steady}), blocks_leaked=free - engine.stats().num_free_blocks,
        kv_blocks_dense=-(-(generated + 4) // bs), rss_growth_mib=round(rss_growth, 1), samples=samples,
    )
    ok = (generated == args.tokens and bool(steady) and set(result["blocks_seen"]) <= allowed
          and result["blocks_leaked"] == 0 and rss_growth <= args.max_rss_growth_mib)
    if args.json:
        print(json.dumps(result))
    else:
        for s in samples[:: max(1, len(samples) // 20)]:
            print(f"{s['tokens']:>8,} tokens  {s['blocks']:>4} blocks  RSS {s['rss_mib']:>7.1f} MiB  {s['seconds']:>7.1f} s")
        print(f"{generated:,} tokens in {result['seconds']} s: blocks held {result['blocks_seen']} (allowed {sorted(allowed)}; "
              f"dense would hold {result['kv_blocks_dense']:,}), RSS +{result['rss_growth_mib']} MiB after the window "
              f"filled, {result['blocks_leaked']} blocks leaked: {'ok' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
