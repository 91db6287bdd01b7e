"""`kvserve bench latency`: one request at a time — time to first token and decode speed, side by side.

Each iteration sends one random-token prompt of ``--input-len`` tokens and
generates ``--output-len`` tokens greedily (EOS ignored), timing every token.
Iteration ``i`` uses the same prompt for every engine, and every iteration a new
prompt, so no engine's prefix cache can serve it. Reported per engine (medians
over ``--num-iters``):

- TTFT: from submitting the request to its first token (the prefill), and the
  fraction of its floor ``max(weight bytes / bandwidth, 2 · params · prompt / FLOP/s)``;
- decode: tokens/s after the first, and the fraction of the bandwidth floor
  ``(weight bytes + context · KV bytes per token) / bandwidth`` per token, at the
  mean context of the decode.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from tqdm import tqdm

from kvserve.bench.hardware_floor import HardwareFloor, fraction, hardware_floor, local_hardware
from kvserve.bench.kvserve_runner import KvserveRunner
from kvserve.bench.peers import PEERS, PeerUnavailable, add_peer_arguments, close_peer, load_peer
from kvserve.bench.report import (command_line, describe_machine, load_average, load_span, markdown_table,
                                  percent, ratio, run_context, text_table, times, write_json)
from kvserve.bench.runner import Runner, StreamTiming, first_tokens_agreement, median
from kvserve.bench.workload import BenchRequest, Workload, random_workload
from kvserve.engine_args import add_engine_arguments

PROG = "kvserve bench latency"
MARKDOWN_HEADER = ["date", "model · dtype", "prompt → new tokens", "kvserve", *PEERS,
                   *(f"kvserve ÷ {peer}" for peer in PEERS), "load", "command"]


def add_bench_latency_arguments(parser: argparse.ArgumentParser) -> None:
    add_engine_arguments(parser)
    g = parser.add_argument_group("workload")
    g.add_argument("--input-len", type=int, default=128, help="prompt tokens")
    g.add_argument("--output-len", type=int, default=128, help="generated tokens (at least 2)")
    g.add_argument("--num-iters", type=int, default=3, help="timed requests per engine (medians are reported)")
    g.add_argument("--num-iters-warmup", type=int, default=1, help="untimed short requests per engine first")
    g.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    add_peer_arguments(parser, hf_batch_size=False)
    out = parser.add_argument_group("output")
    out.add_argument("--output", default=None, metavar="JSON", help="write the full report here")
    out.add_argument("--remeasure-hardware", action="store_true",
                     help="measure the machine's bandwidth and FLOP/s again instead of using the cached numbers")
    parser.set_defaults(bench_parser=parser)


@dataclass
class LatencyResult:
    engine: str
    settings: dict[str, Any]
    ttft_s: list[float]
    decode_step_s: list[float]
    ttft_floor_s: float | None
    decode_step_floor_s: float
    first_tokens_agreement: float | None

    @property
    def decode_tokens_per_s(self) -> float:
        return 1 / median(self.decode_step_s)

    @property
    def fraction_of_bandwidth_floor(self) -> float | None:
        return fraction(self.decode_step_floor_s, median(self.decode_step_s))

    @property
    def ttft_fraction_of_floor(self) -> float | None:
        return fraction(self.ttft_floor_s, median(self.ttft_s))

    def to_dict(self) -> dict[str, Any]:
        return {
            "engine": self.engine,
            "settings": self.settings,
            "ttft_s": median(self.ttft_s),
            "ttft_s_all": self.ttft_s,
            "ttft_fraction_of_floor": self.ttft_fraction_of_floor,
            "decode_tokens_per_s": self.decode_tokens_per_s,
            "decode_step_s_all": self.decode_step_s,
            "decode_fraction_of_bandwidth_floor": self.fraction_of_bandwidth_floor,
            "first_8_tokens_agreement_with_kvserve": self.first_tokens_agreement,
        }

    def cell(self) -> str:
        """``20.1 tok/s (16.0%), TTFT 85 ms``."""
        return (f"{self.decode_tokens_per_s:.1f} tok/s ({percent(self.fraction_of_bandwidth_floor)}), "
                f"TTFT {1000 * median(self.ttft_s):.0f} ms")


def measure(runner: Runner, prompts: Workload, warmup: list[BenchRequest]) -> list[StreamTiming]:
    """Warm ``runner`` up, then stream each prompt of ``prompts`` alone; checks every token arrived."""
    for request in warmup:
        runner.stream(request.prompt_token_ids, request.output_len)
    timings = []
    for request in tqdm(prompts.requests, desc=f"{runner.name} single stream", unit="req", dynamic_ncols=True):
        timing = runner.stream(request.prompt_token_ids, request.output_len)
        if len(timing.token_ids) != request.output_len:
            raise RuntimeError(f"{runner.name}: generated {len(timing.token_ids)} tokens, "
                               f"expected {request.output_len}")
        timings.append(timing)
    return timings


def _result(runner: Runner, timings: list[StreamTiming], floor: HardwareFloor, prompts: Workload,
            reference: list[StreamTiming] | None) -> LatencyResult:
    input_len, output_len = prompts.input_len[0], prompts.output_len[0]
    agreement = None
    if reference is not None:
        agreement = first_tokens_agreement([t.token_ids for t in reference], [t.token_ids for t in timings])
    return LatencyResult(
        engine=runner.name,
        settings=runner.settings(),
        ttft_s=[t.ttft_s for t in timings],
        decode_step_s=[t.decode_step_s for t in timings],
        ttft_floor_s=floor.prefill_seconds(input_len),
        decode_step_floor_s=floor.decode_step_seconds(input_len + output_len / 2),
        first_tokens_agreement=agreement,
    )


def run_bench_latency(args: argparse.Namespace) -> int:
    if args.output_len < 2:
        raise ValueError(f"output_len must be >= 2 to time the decode, got {args.output_len}")
    if args.num_iters < 1 or args.num_iters_warmup < 0:
        raise ValueError(f"num_iters must be >= 1 and num_iters_warmup >= 0, got {args.num_iters}, "
                         f"{args.num_iters_warmup}")
    context = run_context(command_line(PROG, args.bench_parser, args))
    hardware = local_hardware(args.remeasure_hardware)
    kvserve = KvserveRunner.from_args(args)
    engine = kvserve.engine
    floor = hardware_floor(engine.hf_config, engine.config.torch_dtype, hardware, engine.worker_info.weight_bytes)
    vocab = engine.hf_config.vocab_size
    length = (args.input_len, args.input_len), (args.output_len, args.output_len)
    prompts = random_workload(args.num_iters, *length, vocab, args.seed)
    if prompts.max_seq_len > engine.max_seq_len:
        raise ValueError(f"the request needs {prompts.max_seq_len} tokens, but kvserve holds at most "
                         f"{engine.max_seq_len} per sequence; raise --kv-cache-memory-bytes or shorten it")
    warmup = random_workload(max(args.num_iters_warmup, 1), (8, 8), (4, 4), vocab, args.seed + 1)
    warmup_requests = warmup.requests[:args.num_iters_warmup]

    reference = measure(kvserve, prompts, warmup_requests)
    results = [_result(kvserve, reference, floor, prompts, None)]
    skipped: list[dict[str, str]] = []
    same_weights = engine.config.load_format != "dummy" or args.hf_model is not None
    for name in args.compare:
        try:
            peer = load_peer(name, kvserve, args, prompts.max_seq_len)
        except PeerUnavailable as exc:
            print(f"skipping {name}: {exc}")
            skipped.append({"engine": name, "reason": str(exc)})
            continue
        try:
            timings = measure(peer, prompts, warmup_requests)
        finally:
            close_peer(peer)
        results.append(_result(peer, timings, floor, prompts, reference if same_weights else None))
        del peer
    context["load_average_1min_end"] = load_average()

    report = _report(context, kvserve, floor, prompts, results, skipped)
    print(_summary(report, results, skipped))
    if args.output:
        write_json(args.output, report)
        print(f"wrote {args.output}")
    return 0


def _report(context: dict[str, Any], kvserve: KvserveRunner, floor: HardwareFloor, prompts: Workload,
            results: list[LatencyResult], skipped: list[dict[str, str]]) -> dict[str, Any]:
    base = results[0]
    report = {
        "benchmark": "latency",
        "context": context,
        "model": {"path": kvserve.engine.model_path, "num_params": floor.num_params, "dtype": floor.dtype},
        "floor": {**floor.to_dict(), "ttft_s": base.ttft_floor_s, "decode_step_s": base.decode_step_floor_s},
        "workload": {"input_len": prompts.input_len[0], "output_len": prompts.output_len[0],
                     "num_iters": len(prompts.requests), "seed": prompts.seed},
        "results": [r.to_dict() for r in results],
        "skipped": skipped,
        "speedup_decode_tokens_per_s": {f"kvserve/{r.engine}": ratio(base.decode_tokens_per_s, r.decode_tokens_per_s)
                                        for r in results[1:]},
        "speedup_ttft": {f"kvserve/{r.engine}": ratio(median(r.ttft_s), median(base.ttft_s)) for r in results[1:]},
    }
    report["markdown"] = markdown_table(MARKDOWN_HEADER, [_markdown_row(report, results, skipped)])
    return report


def _markdown_row(report: dict[str, Any], results: list[LatencyResult], skipped: list[dict[str, str]]) -> list[str]:
    by_engine = {r.engine: r for r in results}
    skipped_names = {s["engine"] for s in skipped}
    cells = [by_engine[p].cell() if p in by_engine else "skipped" if p in skipped_names else "—" for p in PEERS]
    speedups = []
    for peer in PEERS:
        key = f"kvserve/{peer}"
        speedups.append("—" if peer not in by_engine else
                        f"decode {times(report['speedup_decode_tokens_per_s'][key])}, "
                        f"TTFT {times(report['speedup_ttft'][key])}")
    context, workload = report["context"], report["workload"]
    model = f"{report['model']['path'].rsplit('/', 1)[-1]} · {report['model']['dtype']}"
    return [context["date"][:10], model, f"{workload['input_len']} → {workload['output_len']}",
            by_engine["kvserve"].cell(), *cells, *speedups, load_span(context), f"`{context['command']}`"]


def _summary(report: dict[str, Any], results: list[LatencyResult], skipped: list[dict[str, str]]) -> str:
    context, floor, workload = report["context"], report["floor"], report["workload"]
    ttft_floor = "n/a" if floor["ttft_s"] is None else f"{1000 * floor['ttft_s']:.1f} ms"
    lines = [
        f"{PROG} · {context['date']} · load {load_span(context)}",
        f"machine: {describe_machine(context)}",
        f"model: {report['model']['path']} ({floor['num_params'] / 1e6:.1f} M params, {floor['dtype']})",
        f"floor: {floor['memory_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s read → "
        f"{1 / floor['decode_step_s']:.1f} tok/s single-stream decode; TTFT {ttft_floor}",
        f"workload: {workload['input_len']}-token prompt, {workload['output_len']} new tokens, "
        f"{workload['num_iters']} iterations (medians)",
        "",
    ]
    base = results[0]
    header = ["engine", "TTFT ms", "TTFT of floor", "decode tok/s", "of bandwidth floor", "kvserve ÷ engine (decode)",
              "first-8 agreement"]
    rows = [[r.engine, f"{1000 * median(r.ttft_s):.1f}", percent(r.ttft_fraction_of_floor),
             f"{r.decode_tokens_per_s:.1f}", percent(r.fraction_of_bandwidth_floor),
             times(ratio(base.decode_tokens_per_s, r.decode_tokens_per_s)) if r is not base else "",
             percent(r.first_tokens_agreement) if r.first_tokens_agreement is not None else ""]
            for r in results]
    lines.append(text_table(header, rows))
    lines += [f"skipped {s['engine']}: {s['reason']}" for s in skipped]
    lines += ["", f"command: {context['command']}", "", report["markdown"]]
    return "\n".join(lines)
