"""The dashboard's own work per frame, timed directly: what an open dashboard adds to the server each second.

    PYTHONPATH=src python benchmarks/dashboard_work.py [--requests 64] [--steps 60]

Runs the default model's engine with `--requests` requests of 128 tokens in flight and, after each step, does
what an open dashboard makes the server do: the engine thread's block-pool snapshot (`LLMEngine.snapshot()`),
and the event loop's frame (`DashboardFeed.frame()`) and its JSON. Prints the medians; at the server's 4
snapshots and 4 frames a second their sum times 4 is the dashboard's share of a second. The end-to-end
comparison is benchmarks/dashboard_overhead.py; on a 2-core machine its runs scatter by several percent.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from kvserve import LLM, SamplingParams
from kvserve.engine.async_engine import IterationStats
from kvserve.entrypoints.openai.dashboard_feed import DashboardFeed
from kvserve.entrypoints.openai.web_ui import FRAME_INTERVAL_S, SNAPSHOT_INTERVAL_S


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    engine = LLM().llm_engine
    for i in range(args.requests):
        engine.add_request(f"r{i}", f"Tell me story number {i} about the sea and its ships", SamplingParams(max_tokens=128, ignore_eos=True))
    stats = engine.stats()
    feed = DashboardFeed("default", stats.num_blocks, stats.block_size, engine.config.max_num_batched_tokens, engine.config.max_num_seqs)
    times: dict[str, list[float]] = {"step": [], "snapshot": [], "frame": [], "json": []}
    size = 0
    for _ in range(args.steps):
        start = time.perf_counter()
        engine.step()
        times["step"].append(time.perf_counter() - start)
        start = time.perf_counter()
        snapshot = engine.snapshot()
        times["snapshot"].append(time.perf_counter() - start)
        feed.observe(IterationStats(engine=engine.stats(), step=engine.last_step, snapshot=snapshot))
        start = time.perf_counter()
        frame = feed.frame()
        times["frame"].append(time.perf_counter() - start)
        start = time.perf_counter()
        size = len(json.dumps(frame))
        times["json"].append(time.perf_counter() - start)
    ms = {name: statistics.median(values) * 1e3 for name, values in times.items()}
    per_second = ms["snapshot"] / SNAPSHOT_INTERVAL_S + (ms["frame"] + ms["json"]) / FRAME_INTERVAL_S
    print(f"{stats.num_blocks} blocks, {args.requests} requests: step {ms['step']:.1f} ms; snapshot {ms['snapshot']:.3f} ms, "
          f"frame {ms['frame']:.3f} ms, JSON {ms['json']:.3f} ms ({size} bytes); the dashboard's work: "
          f"{per_second:.2f} ms per second = {per_second / 10:.2f}% of one core")


if __name__ == "__main__":
    main()
