"""``kvserve bench ablation``: the classic claims behind kvserve, measured on this machine.

Each ablation turns one optimization off and on in the same run and writes a
markdown table and a PNG plot to the report folder (``--out``), each stating the
machine, the command and the date; ``README.md`` there (or ``--report PATH``)
collects them all. The engine runs with random weights (``load_format="dummy"``)
at a small llama-style shape sized for a CPU (``--shape``); ``--smoke`` shrinks
every workload to seconds, for tests.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import tempfile
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from kvserve.bench.ablations import (
    attention_shapes, batching, chunked_prefill, kv_cache, paged_memory, prefix_caching,
)
from kvserve.bench.ablations.common import AblationContext, AblationResult
from kvserve.estimate.model_shape import ModelShape

ABLATIONS: dict[str, Callable[[AblationContext], AblationResult]] = {
    "kv_cache": kv_cache.run,
    "batching": batching.run,
    "paged_memory": paged_memory.run,
    "prefix_caching": prefix_caching.run,
    "chunked_prefill": chunked_prefill.run,
    "attention_shapes": attention_shapes.run,
}
DEFAULT_SHAPE = "bench-small"
SMOKE_SHAPE = "bench-tiny"


def add_bench_ablation_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``kvserve bench ablation`` options to ``parser``."""
    parser.add_argument("--which", nargs="+", choices=list(ABLATIONS), metavar="NAME",
                        default=None, help=f"ablations to run (default: all): "
                                           f"{', '.join(ABLATIONS)}")
    parser.add_argument("--smoke", action="store_true",
                        help=f"tiny workloads at the {SMOKE_SHAPE} shape: seconds, for tests")
    parser.add_argument("--out", metavar="DIR", default="ablation-report",
                        help="report folder for the tables and plots (default: ablation-report)")
    parser.add_argument("--report", metavar="PATH", default=None,
                        help="the combined markdown report (default: OUT/README.md)")
    parser.add_argument("--shape", metavar="NAME", default=None,
                        help=f"model shape, dummy weights: a bench shape or an estimator preset "
                             f"(default: {DEFAULT_SHAPE}; {SMOKE_SHAPE} with --smoke)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random workloads")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's own choice); on a busy machine "
                             "fewer threads than cores avoid stalls in threads waiting for "
                             "each other")


def run_bench_ablation(args: argparse.Namespace) -> int:
    """Run the chosen ablations and write the report; returns the exit status."""
    import torch

    from kvserve.bench.shapes import bench_shape

    try:
        shape = bench_shape(args.shape or (SMOKE_SHAPE if args.smoke else DEFAULT_SHAPE))
        if args.threads is not None and args.threads < 1:
            raise ValueError(f"threads: got {args.threads}; must be an integer >= 1")
    except ValueError as error:
        print(f"kvserve bench ablation: error: {error}", file=sys.stderr)
        return 2
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads or threads)
    try:
        run_ablations(args, shape)
    finally:
        torch.set_num_threads(threads)
    return 0


def run_ablations(args: argparse.Namespace, shape: ModelShape) -> list[AblationResult]:
    """Run ``args.which`` (default: all) and write ``OUT/<name>.{md,png}``, the report and
    ``OUT/results.json``."""
    from tqdm import tqdm

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = Path(args.report) if args.report else out / "README.md"
    header = report_header(args, shape)
    results: list[AblationResult] = []
    with tempfile.TemporaryDirectory(prefix="kvserve-ablation-") as scratch:
        ctx = AblationContext(shape, args.smoke, Path(scratch), seed=args.seed)
        with tqdm(args.which or list(ABLATIONS), desc="ablations", unit="ablation",
                  disable=None) as bar:
            for name in bar:
                bar.set_postfix_str(name)
                result = ABLATIONS[name](ctx)
                write_ablation(result, out, header)
                results.append(result)
                print(f"{result.title}: {out / (result.name + '.md')}", file=sys.stderr)
    write_report(results, report, out, header)
    (out / "results.json").write_text(json.dumps(
        {"header": header, **{r.name: r.metrics for r in results}}, indent=2))
    print(f"report: {report}", file=sys.stderr)
    return results


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this report."""
    words = ["kvserve", "bench", "ablation"]
    if args.which:
        words += ["--which", *args.which]
    if args.smoke:
        words.append("--smoke")
    for flag in ("shape", "seed", "threads", "out", "report"):
        value = getattr(args, flag)
        if value is not None and not (flag == "seed" and value == 0):
            words += [f"--{flag}", str(value)]
    return shlex.join(words)


def report_header(args: argparse.Namespace, shape: ModelShape) -> str:
    """Machine, command, date and model: the lines every report starts with."""
    import torch

    from kvserve.estimate.hardware import cpu_model, total_ram_bytes

    machine = (f"{platform.node()}: {cpu_model()}, {os.cpu_count()} CPUs, "
               f"{torch.get_num_threads()} torch threads, {total_ram_bytes() / 2**30:,.0f} GiB "
               f"RAM, torch {torch.__version__}")
    model = (f"{shape.name}: llama-style, {shape.num_layers} layers, hidden {shape.hidden_size}, "
             f"{shape.num_heads} heads / {shape.num_kv_heads} KV heads × {shape.head_dim}, "
             f"{shape.num_params / 1e6:,.1f} M parameters, random weights "
             "(`load_format=\"dummy\"`), float32")
    date = datetime.now().astimezone().isoformat(timespec="seconds")
    return "\n".join([f"- Machine: {machine}", f"- Command: `{command_line(args)}`",
                      f"- Date: {date}", f"- Model: {model}"])


def _section(result: AblationResult, image: str, level: str) -> list[str]:
    lines = [f"{level} {result.title}", "", f"**Claim.** {result.claim}", ""]
    if result.setup:
        lines += [f"**Setup.** {result.setup}", ""]
    for table in result.tables:
        lines += [table, ""]
    lines += [f"- {finding}" for finding in result.findings]
    lines += ["", f"![{result.title}]({image})", ""]
    return lines


def write_ablation(result: AblationResult, out: Path, header: str) -> None:
    """``OUT/<name>.md`` and ``OUT/<name>.png`` for one ablation."""
    result.figure.savefig(out / f"{result.name}.png", dpi=100)
    section = _section(result, f"{result.name}.png", "##")[1:]  # the title goes first
    lines = [f"# Ablation: {result.title}", "", header, "", *section]
    (out / f"{result.name}.md").write_text("\n".join(lines))


def write_report(results: list[AblationResult], report: Path, out: Path, header: str) -> None:
    """One markdown file with every ablation, its images linked relative to the report."""
    report.parent.mkdir(parents=True, exist_ok=True)
    lines = ["# kvserve ablations", "",
             "Each optimization measured off and on in the same run, on this machine "
             "(the machine is shared and noisy: compare numbers within a table, not across "
             "runs).", "", header, ""]
    for result in results:
        image = Path(os.path.relpath(out / f"{result.name}.png", report.parent)).as_posix()
        lines += _section(result, image, "##")
    report.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvserve bench ablation", description=__doc__)
    add_bench_ablation_arguments(parser)
    return run_bench_ablation(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
