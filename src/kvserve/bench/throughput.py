"""`kvserve bench throughput`: offline throughput, side by side with transformers, llama.cpp and llama-server.

Like vLLM's offline throughput benchmark: a workload of random-token prompts
(fixed lengths or uniform ranges), every request generating exactly its output
length greedily, all submitted at once. kvserve runs it with continuous
batching; each peer named by ``--compare`` runs the same prompts on the same
weights in the same invocation, one after the other. Each engine first runs a
tiny warm-up workload (kernel set-up is not part of the timing).

Reported per engine: requests/s, output tok/s, total (prompt + output) tok/s,
the fraction of the machine's compute floor ``2 · params · total tokens / FLOP/s``
that the run reached, and kvserve's speed-up over it.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from kvserve.bench.hardware_floor import HardwareFloor, fraction, hardware_floor, local_hardware
from kvserve.bench.kvserve_runner import KvserveRunner
from kvserve.bench.peers import PEERS, PeerUnavailable, add_peer_arguments, close_peer, load_peer
from kvserve.bench.report import (command_line, describe_machine, load_average, load_span, markdown_table,
                                  percent, ratio, run_context, text_table, times, write_json)
from kvserve.bench.runner import BatchRun, Runner, first_tokens_agreement
from kvserve.bench.workload import Workload, add_length_arguments, length_range, random_workload
from kvserve.engine_args import add_engine_arguments

PROG = "kvserve bench throughput"
MARKDOWN_HEADER = ["date", "model · dtype", "workload", "kvserve", *PEERS,
                   *(f"kvserve ÷ {peer}" for peer in PEERS), "load", "command"]


def add_bench_throughput_arguments(parser: argparse.ArgumentParser) -> None:
    add_engine_arguments(parser)
    g = parser.add_argument_group("workload")
    g.add_argument("--num-prompts", type=int, default=128)
    g.add_argument("--seed", type=int, default=0, help="seed of the random prompts and lengths")
    add_length_arguments(g, input_len=256, output_len=128)
    add_peer_arguments(parser, hf_batch_size=True)
    out = parser.add_argument_group("output")
    out.add_argument("--output", default=None, metavar="JSON", help="write the full report here")
    out.add_argument("--remeasure-hardware", action="store_true",
                     help="measure the machine's bandwidth and FLOP/s again instead of using the cached numbers")
    parser.set_defaults(bench_parser=parser)


@dataclass
class ThroughputResult:
    engine: str
    settings: dict[str, Any]
    elapsed_s: float
    num_requests: int
    num_prompt_tokens: int
    num_output_tokens: int
    fraction_of_compute_floor: float | None
    first_tokens_agreement: float | None

    @property
    def total_tokens_per_s(self) -> float:
        return (self.num_prompt_tokens + self.num_output_tokens) / self.elapsed_s

    @property
    def output_tokens_per_s(self) -> float:
        return self.num_output_tokens / self.elapsed_s

    def to_dict(self) -> dict[str, Any]:
        return {
            "engine": self.engine,
            "settings": self.settings,
            "elapsed_s": self.elapsed_s,
            "num_requests": self.num_requests,
            "num_prompt_tokens": self.num_prompt_tokens,
            "num_output_tokens": self.num_output_tokens,
            "requests_per_s": self.num_requests / self.elapsed_s,
            "output_tokens_per_s": self.output_tokens_per_s,
            "total_tokens_per_s": self.total_tokens_per_s,
            "fraction_of_compute_floor": self.fraction_of_compute_floor,
            "first_8_tokens_agreement_with_kvserve": self.first_tokens_agreement,
        }

    def cell(self) -> str:
        """``57 (176, 22.0%)``: output tok/s (total tok/s, fraction of the compute floor)."""
        return (f"{self.output_tokens_per_s:.1f} ({self.total_tokens_per_s:.1f}, "
                f"{percent(self.fraction_of_compute_floor)})")


def measure(runner: Runner, workload: Workload, warmup: Workload,
            floor: HardwareFloor) -> tuple[BatchRun, float | None]:
    """Warm ``runner`` up, then time it on ``workload``; returns the run and its fraction of the compute floor.

    Raises RuntimeError when a request did not get exactly its output length.
    """
    runner.generate(warmup, progress=False)
    run = runner.generate(workload, progress=True)
    lengths = [len(tokens) for tokens in run.output_token_ids]
    expected = [r.output_len for r in workload.requests]
    if lengths != expected:
        short = next(i for i, (a, b) in enumerate(zip(lengths, expected)) if a != b)
        raise RuntimeError(f"{runner.name}: request {short} generated {lengths[short]} tokens, "
                           f"expected {expected[short]}")
    return run, fraction(floor.compute_seconds(workload.num_total_tokens), run.elapsed_s)


def _result(runner: Runner, workload: Workload, run: BatchRun, floor_fraction: float | None,
            agreement: float | None) -> ThroughputResult:
    return ThroughputResult(runner.name, runner.settings(), run.elapsed_s, len(workload.requests),
                            workload.num_prompt_tokens, workload.num_output_tokens, floor_fraction, agreement)


def run_bench_throughput(args: argparse.Namespace) -> int:
    context = run_context(command_line(PROG, args.bench_parser, args))
    hardware = local_hardware(args.remeasure_hardware)
    kvserve = KvserveRunner.from_args(args)
    engine = kvserve.engine
    floor = hardware_floor(engine.hf_config, engine.config.torch_dtype, hardware, engine.worker_info.weight_bytes)
    vocab = engine.hf_config.vocab_size
    workload = random_workload(args.num_prompts, length_range(args, "input"), length_range(args, "output"),
                               vocab, args.seed)
    if workload.max_seq_len > engine.max_seq_len:
        raise ValueError(f"the longest request needs {workload.max_seq_len} tokens, but kvserve holds at most "
                         f"{engine.max_seq_len} per sequence; raise --kv-cache-memory-bytes or shorten the workload")
    warmup = random_workload(2, (8, 8), (4, 4), vocab, args.seed + 1)

    reference, floor_fraction = measure(kvserve, workload, warmup, floor)
    results = [_result(kvserve, workload, reference, floor_fraction, None)]
    skipped: list[dict[str, str]] = []
    same_weights = engine.config.load_format != "dummy" or args.hf_model is not None
    for name in args.compare:
        try:
            peer = load_peer(name, kvserve, args, workload.max_seq_len)
        except PeerUnavailable as exc:
            print(f"skipping {name}: {exc}")
            skipped.append({"engine": name, "reason": str(exc)})
            continue
        try:
            run, floor_fraction = measure(peer, workload, warmup, floor)
        finally:
            close_peer(peer)
        agreement = first_tokens_agreement(reference.output_token_ids, run.output_token_ids) if same_weights else None
        results.append(_result(peer, workload, run, floor_fraction, agreement))
        del peer
    context["load_average_1min_end"] = load_average()

    report = _report(context, kvserve, floor, workload, results, skipped)
    print(_summary(report, results, skipped))
    if args.output:
        write_json(args.output, report)
        print(f"wrote {args.output}")
    return 0


def _report(context: dict[str, Any], kvserve: KvserveRunner, floor: HardwareFloor, workload: Workload,
            results: list[ThroughputResult], skipped: list[dict[str, str]]) -> dict[str, Any]:
    base = results[0]
    speedups = {f"kvserve/{r.engine}": ratio(base.total_tokens_per_s, r.total_tokens_per_s) for r in results[1:]}
    report = {
        "benchmark": "throughput",
        "context": context,
        "model": {"path": kvserve.engine.model_path, "num_params": floor.num_params, "dtype": floor.dtype},
        "floor": {**floor.to_dict(), "compute_s": floor.compute_seconds(workload.num_total_tokens)},
        "workload": {**workload.to_dict(), "description": workload.describe()},
        "results": [r.to_dict() for r in results],
        "skipped": skipped,
        "speedup_total_tokens_per_s": speedups,
    }
    report["markdown"] = markdown_table(MARKDOWN_HEADER, [_markdown_row(report, results, skipped)])
    return report


def _markdown_row(report: dict[str, Any], results: list[ThroughputResult], skipped: list[dict[str, str]]) -> list[str]:
    by_engine = {r.engine: r for r in results}
    skipped_names = {s["engine"] for s in skipped}
    cells = [by_engine[p].cell() if p in by_engine else "skipped" if p in skipped_names else "—" for p in PEERS]
    speedups = [times(report["speedup_total_tokens_per_s"].get(f"kvserve/{p}")) if p in by_engine else "—"
                for p in PEERS]
    context = report["context"]
    model = f"{report['model']['path'].rsplit('/', 1)[-1]} · {report['model']['dtype']}"
    return [context["date"][:10], model, report["workload"]["description"], by_engine["kvserve"].cell(),
            *cells, *speedups, load_span(context), f"`{context['command']}`"]


def _summary(report: dict[str, Any], results: list[ThroughputResult], skipped: list[dict[str, str]]) -> str:
    context, floor, workload = report["context"], report["floor"], report["workload"]
    flops = "n/a" if floor["matmul_flops_per_s"] is None else f"{floor['matmul_flops_per_s'] / 1e9:.1f}"
    floor_s = "n/a" if floor["compute_s"] is None else f"{floor['compute_s']:.3g} s"
    lines = [
        f"{PROG} · {context['date']} · load {load_span(context)}",
        f"machine: {describe_machine(context)}",
        f"model: {report['model']['path']} ({floor['num_params'] / 1e6:.1f} M params, {floor['dtype']})",
        f"floor: {flops} GFLOP/s {floor['dtype']} matmul → {floor_s} for {workload['num_total_tokens']} tokens",
        f"workload: {workload['description']}",
        "",
    ]
    base = results[0]
    header = ["engine", "req/s", "output tok/s", "total tok/s", "of compute floor", "kvserve ÷ engine",
              "first-8 agreement"]
    rows = [[r.engine, f"{r.num_requests / r.elapsed_s:.2f}", f"{r.output_tokens_per_s:.1f}",
             f"{r.total_tokens_per_s:.1f}", percent(r.fraction_of_compute_floor),
             times(ratio(base.total_tokens_per_s, r.total_tokens_per_s)) if r is not base else "",
             percent(r.first_tokens_agreement) if r.first_tokens_agreement is not None else ""]
            for r in results]
    lines.append(text_table(header, rows))
    lines += [f"skipped {s['engine']}: {s['reason']}" for s in skipped]
    lines += ["", f"command: {context['command']}", "", report["markdown"]]
    return "\n".join(lines)
