"""``kvserve estimate``: memory, concurrency and roofline floors for a model on hardware.

The main ``kvserve`` command wires :func:`add_estimate_arguments` and
:func:`run_estimate` into its ``estimate`` subcommand; ``python -m
kvserve.estimate.cli`` runs the same thing on its own.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable

from kvserve.estimate.arguments import estimate_params_from_args
from kvserve.estimate.hardware import get_hardware, hardware_names
from kvserve.estimate.presets import preset_names
from kvserve.estimate.report import format_seconds, report_meta
from kvserve.estimate.roofline import (
    COMPUTE_DTYPES, KV_DTYPES, KV_SCALE_BYTES, WEIGHT_DTYPES, Estimate, estimate,
)
from kvserve.estimate.shape_loader import load_model_shape
from kvserve.estimate.validate import add_validate_arguments, run_validate


def add_estimate_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``kvserve estimate`` options to ``parser``."""
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", metavar="DIR|FILE.gguf|HUB_ID",
                        help="a model directory with a config.json, a .gguf file (its metadata), or a hub id whose "
                             "config.json is in the local Hugging Face cache")
    source.add_argument("--config", metavar="PATH", help="a config.json file")
    source.add_argument("--preset", metavar="NAME",
                        help=f"a named model shape: {', '.join(preset_names())} (llama-2-7b or Llama-2-7b-hf work too)")
    parser.add_argument("--hardware", metavar="NAME[,NAME...]", default="local",
                        help=f"device kind: {', '.join(hardware_names())} (default: local, measured once and cached); "
                             "several, comma-separated, give a report each and share the plot")
    parser.add_argument("--num-devices", type=int, default=1,
                        help="devices used with tensor parallelism (default: 1)")
    parser.add_argument("--dtype", default="auto",
                        help=f"compute/activation dtype: auto, {', '.join(COMPUTE_DTYPES)} "
                             "(auto: the highest peak FLOP/s on the hardware, bf16 on ties)")
    parser.add_argument("--weights-dtype", default=None,
                        help=f"weight storage: {', '.join(WEIGHT_DTYPES)} (default: --dtype)")
    parser.add_argument("--kv-dtype", default=None,
                        help=f"KV cache dtype: {', '.join(KV_DTYPES)} (default: --dtype); int8 and fp8 (fp8_e4m3) "
                             "count kvserve's 4-byte scale per token and kv head for K and V "
                             "(the engine's --kv-cache-dtype)")
    parser.add_argument("--input-len", type=int, default=512, help="prompt tokens (default: 512)")
    parser.add_argument("--output-len", type=int, default=512,
                        help="generated tokens (default: 512)")
    parser.add_argument("--batch", type=int, default=1,
                        help="sequences decoded together (default: 1)")
    parser.add_argument("--memory-fraction", type=float, default=0.9,
                        help="share of each device's memory the engine may use (default: 0.9)")
    parser.add_argument("--weight-overhead", type=float, default=1.0,
                        help="multiply weight bytes by this; 1.2 is the rule of thumb "
                             "'inference memory = 1.2 x weights + KV' (default: 1.0)")
    parser.add_argument("--block-size", type=int, default=16,
                        help="KV cache block size in tokens (default: 16)")
    parser.add_argument("--kv-bytes-per-token", metavar="SIZE", default=None,
                        help="override the exact KV size per token, e.g. 1MB for the "
                             "'1 MB per token' rule of thumb")
    parser.add_argument("--device-memory", metavar="SIZE", default=None,
                        help="override the memory of one device, e.g. 40GB (= 40e9 bytes) "
                             "or 40GiB")
    parser.add_argument("--kv-cache-memory-bytes", metavar="SIZE", default=None,
                        help="the KV cache's byte budget per device, as the engine's "
                             "kv_cache_memory_bytes (replaces memory x fraction - weights)")
    parser.add_argument("--sliding-window", type=int, default=None,
                        help="the engine's --sliding-window: every layer's window (replacing the model's)")
    parser.add_argument("--attention-sinks", type=int, default=0,
                        help="the engine's --attention-sinks: a sequence holds min(context, S + W) tokens")
    add_validate_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table (a list for several hardware)")
    parser.add_argument("--plot", metavar="FILE.png", default=None,
                        help="also draw max concurrency vs context length for each --hardware, and the decode roofline "
                             "(step floor vs batch, its memory and compute floors, the knee) into FILE.png (matplotlib)")


def run_estimate(args: argparse.Namespace) -> int:
    """Compute and print the estimate (or, with ``--validate``, check it against the engine).

    Returns the exit status: 2 on bad input, 1 when ``--validate`` finds the engine's
    KV cache differs from the prediction.
    """
    if args.validate:
        return run_validate(args)
    if args.model is None and args.config is None and args.preset is None:
        print("kvserve estimate: error: model/config/preset: give one of --model DIR, "
              "--config PATH or --preset NAME", file=sys.stderr)
        return 2
    try:
        shape = load_model_shape(model=args.model, config=args.config, preset=args.preset)
        hardware = [get_hardware(name) for name in args.hardware.split(",")]
        params = estimate_params_from_args(args)
        results = [estimate(shape, hw, params) for hw in hardware]
        if args.plot is not None:
            _plotter()(shape, hardware, params, args.plot)
    except ValueError as error:
        print(f"kvserve estimate: error: {error}", file=sys.stderr)
        return 2
    meta = report_meta(args)
    if args.json:
        reports = [{"meta": meta, **result.to_dict()} for result in results]
        print(json.dumps(reports[0] if len(reports) == 1 else reports, indent=2))
    else:
        print("\n\n".join(format_table(result, meta) for result in results))
    if args.plot is not None:
        print(f"plot: {args.plot}", file=sys.stderr)
    return 0


def _plotter() -> Callable[..., None]:
    """`plot_estimates`, which needs matplotlib: the optional [bench] extra."""
    try:
        from kvserve.bench.estimate_plot import plot_estimates
    except ImportError as error:
        raise ValueError(f"plot: drawing needs the optional [bench] dependencies ({error.name} is missing); install "
                         "them with: pip install 'kvserve[bench]'") from None
    return plot_estimates


def format_table(result: Estimate, meta: dict[str, str]) -> str:
    """The human-readable report: sections of aligned ``label  value`` rows."""
    p, m, hw = result.params, result.model, result.hardware
    n = p.num_devices
    approx_err = result.approx_num_params / result.num_params - 1
    rows: list[tuple[str, str] | str] = [
        f"kvserve estimate: {m.name} on {n} × {hw.name}",
        f"  {meta['date']} · machine {meta['machine']}",
        f"  {meta['command']}",
        "",
        f"Model  {m.name}: {m.architecture}-style, {m.num_layers} layers, hidden {m.hidden_size}, "
        f"{m.attention_kind} ({m.num_heads} heads, {m.num_kv_heads} kv heads × {m.head_dim})",
        ("parameters (exact)", f"{result.num_params:,}"),
        ("12·n·h² + V·h", f"{result.approx_num_params:,} ({approx_err:+.1%})"),
        ("weights", f"{_bytes(result.weight_bytes)} in {result.weights_dtype}"
                    + (f" × {p.weight_overhead} overhead" if p.weight_overhead != 1 else "")),
        "",
        f"Hardware  {n} × {hw.description}",
        ("memory per device", _bytes(result.device_memory_bytes)),
        ("bandwidth per device", f"{hw.memory_bandwidth / 1e9:,.1f} GB/s"),
        ("peak compute", f"{hw.flops(result.compute_dtype) / 1e12:,.2f} TFLOP/s "
                         f"{result.compute_dtype} per device"),
        ("interconnect", "—" if hw.interconnect_bandwidth is None
         else f"{hw.interconnect_bandwidth / 1e9:,.0f} GB/s per direction"),
        "",
        f"KV cache  {result.kv_dtype}, block size {p.block_size}",
        ("bytes per token", _kv_per_token(result)),
        ("memory for KV", _kv_budget(result)),
        ("tokens held", f"{result.kv_cache_tokens:,}"),
        ("max concurrent sequences", f"{result.max_concurrent_sequences:,.1f} of "
                                     f"{p.input_len} + {p.output_len} tokens" + _held(result)),
        ("KV cache allocated", f"{_bytes(result.kv_cache_bytes)} in whole blocks"),
        "",
        f"Decode  batch {p.batch}, mean context {result.decode_context_len:,.0f} tokens" + _attended(result),
        ("memory term", format_seconds(result.decode.memory_s) + "  (weights + KV read) / bandwidth"),
        ("compute term", format_seconds(result.decode.compute_s) + "  (2·P + attention)·B / FLOP/s"),
        ("tensor-parallel comm", format_seconds(result.decode.comm_s)
         + f"  2 all-reduces × {m.num_layers} layers"),
        ("step floor", f"{format_seconds(result.decode.seconds)}  {result.decode.bound}-bound"),
        ("compute-bound from batch", _batch(result.crossover_batch)
         + f"  ({_batch(result.crossover_batch_weights_only)} ignoring KV reads)"),
        "",
        f"Prefill  batch {p.batch} × {p.input_len} tokens",
        ("floor", f"{format_seconds(result.prefill.seconds)}  {result.prefill.bound}-bound "
                  f"(memory {format_seconds(result.prefill.memory_s)}, compute "
                  f"{format_seconds(result.prefill.compute_s)}, comm {format_seconds(result.prefill.comm_s)})"),
        "",
        "Throughput (upper bounds)",
        ("decode", f"{result.decode_tokens_per_s:,.1f} tokens/s for the batch, "
                   f"{result.per_sequence_tokens_per_s:,.1f} per sequence"),
        ("request", f"{format_seconds(result.request_latency_s)} for {p.input_len} + {p.output_len} "
                    f"tokens → {result.overall_tokens_per_s:,.1f} tokens/s overall"),
    ]
    if result.notes:
        rows += ["", "Notes", *[f"  ! {note}" for note in result.notes]]
    width = max(len(r[0]) for r in rows if isinstance(r, tuple)) + 2
    return "\n".join(r if isinstance(r, str) else f"  {r[0]:<{width}}{r[1]}" for r in rows)


def _held(result: Estimate) -> str:
    """How much of a sequence stays in the cache, where a sliding window on every layer bounds it."""
    p = result.params
    window = p.sliding_window or result.model.kv_window
    if window is None:
        return ""
    sinks = f" + {p.attention_sinks:,} attention sinks" if p.attention_sinks else ""
    return f", each holding {result.sequence_kv_tokens:,} (sliding window {window:,}{sinks})"


def _attended(result: Estimate) -> str:
    if result.decode_attended_len == result.decode_context_len:
        return ""
    return f", {result.decode_attended_len:,.0f} read per layer (sliding windows)"


def _kv_budget(result: Estimate) -> str:
    p, n = result.params, result.params.num_devices
    budget = _bytes(max(result.kv_cache_budget_bytes, 0))
    if p.kv_cache_memory_bytes is not None:
        return f"{budget} = {n} × {p.kv_cache_memory_bytes:,.0f} B given"
    return (f"{budget} = {n} × {_bytes(result.device_memory_bytes, short=True)} × "
            f"{p.memory_fraction} − {p.weight_overhead:g} × weights")


def _kv_per_token(result: Estimate) -> str:
    text = f"{result.kv_bytes_per_token:,.0f} B ({result.kv_bytes_per_token / 2**20:.3f} MiB)"
    if result.params.kv_bytes_per_token is not None:
        return text + " given"
    m = result.model
    scale = KV_SCALE_BYTES.get(result.kv_dtype)
    row = f"{m.head_dim} × {result.kv_dtype}" if scale is None else f"({m.head_dim} × {result.kv_dtype} + {scale} B scale)"
    return text + f" = 2 × {m.num_layers} × {m.num_kv_heads} × {row}"


def _bytes(num: float, short: bool = False) -> str:
    if short:
        return f"{num / 2**30:,.2f} GiB"
    return f"{num / 1e9:,.2f} GB ({num / 2**30:,.2f} GiB)"


def _batch(value: float) -> str:
    return "never (KV reads grow faster than compute)" if math.isinf(value) else f"{value:,.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="kvserve estimate",
        description="Memory, concurrency and roofline-latency floors for a model on hardware.")
    add_estimate_arguments(parser)
    return run_estimate(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
