"""What an open dashboard costs the server: `kvserve bench serve` with and without a dashboard client, same run.

    python benchmarks/dashboard_overhead.py [--rounds 4] [--num-prompts 64] [--input-len 128] [--output-len 128]
                                            [-- extra `kvserve serve` arguments, e.g. --model DIR]

Starts one `kvserve serve` (the built-in default model unless told otherwise), then runs the serving
benchmark `--rounds` times in each condition, alternating the order (off/on, on/off, ...) so drift in
the shared machine falls on both alike: "on" has a client (a process of its own) reading /dashboard/events the whole run, as
an open dashboard tab does (so the engine thread takes its block-pool snapshots and the event loop
builds and sends its frames); "off" has none. Prints each run's output tokens/s, and the ratio
on/off of each pair and their median. The client reads the frames without drawing them: drawing is the
browser's work, on the viewer's machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from kvserve.bench.serve import benchmark



class DashboardReader:
    """A separate process reading the dashboard's event stream until stopped, as a browser tab is (a thread of
    this process would take the GIL from the benchmark's own client); counts the frames."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.frames = 0

    def __enter__(self) -> DashboardReader:
        self._proc = subprocess.Popen([sys.executable, __file__, "--read-events", self.url], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True)
        return self

    def __exit__(self, *exc: object) -> None:
        out, _ = self._proc.communicate("", timeout=30)  # closing its stdin ends it
        self.frames = int(out.strip() or 0)


def read_events(url: str) -> None:
    """The reader process: count frames until stdin closes, then print the count."""
    frames = 0

    def read() -> None:
        nonlocal frames
        with httpx.stream("GET", url + "/dashboard/events", timeout=30) as response:
            for line in response.iter_lines():
                frames += line.startswith("data: ")

    threading.Thread(target=read, daemon=True).start()
    sys.stdin.read()
    print(frames, flush=True)


def start_server(port: int, serve_args: list[str]) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "kvserve.entrypoints.cli", "serve", "--port", str(port), *serve_args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode}")
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("the server did not come up in 300 s")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--output", default=None, help="write the runs as JSON here")
    parser.add_argument("--read-events", metavar="URL", default=None, help=argparse.SUPPRESS)  # the reader process
    args, serve_args = parser.parse_known_args()
    if args.read_events:
        read_events(args.read_events)
        return
    serve_args = [a for a in serve_args if a != "--"]
    url = f"http://127.0.0.1:{args.port}"
    bench_args = argparse.Namespace(
        url=url, model_name=None, num_prompts=args.num_prompts, request_rate=float("inf"), max_concurrency=None,
        input_len=args.input_len, output_len=args.output_len, dataset=None, seed=0, max_seconds=600.0,
    )
    proc = start_server(args.port, serve_args)
    runs: list[dict] = []
    try:
        asyncio.run(benchmark(bench_args))  # warm-up: kernels, allocator, prefix of nothing
        for round_ in range(args.rounds):
            for dashboard in ((False, True) if round_ % 2 == 0 else (True, False)):
                if dashboard:
                    with DashboardReader(url) as reader:
                        summary = asyncio.run(benchmark(bench_args))
                    assert reader.frames > 0, "the dashboard client got no frame"
                else:
                    reader = None
                    summary = asyncio.run(benchmark(bench_args))
                run = {"round": round_, "dashboard": dashboard, "output_throughput": summary["output_throughput"],
                       "duration": summary["duration"], "completed": summary["completed"],
                       "frames": reader.frames if reader else 0}
                runs.append(run)
                print(json.dumps(run), flush=True)
    finally:
        proc.terminate()
        proc.wait(30)
    ratios = []
    for round_ in range(args.rounds):
        on = next(r for r in runs if r["round"] == round_ and r["dashboard"])
        off = next(r for r in runs if r["round"] == round_ and not r["dashboard"])
        ratios.append(on["output_throughput"] / off["output_throughput"])
    print(f"with / without a dashboard, output tokens/s per round: {', '.join(f'{r:.3f}' for r in ratios)}; "
          f"median {statistics.median(ratios):.3f}")
    if args.output:
        Path(args.output).write_text(json.dumps({"runs": runs, "ratios": ratios}, indent=2) + "\n")


if __name__ == "__main__":
    main()
