"""What every benchmark report carries: the machine, the command, the date; JSON and markdown output.

The machine is shared and noisy, so a report also records the load average
before and after the run: a result measured under load is only comparable with
the results of the same invocation.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from kvserve.estimate.hardware import cpu_model, total_ram_bytes

_CPU_FEATURES = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "neon", "asimd")


def command_line(prog: str, parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """The command that reproduces ``args``: ``prog`` followed by every option not at its default."""
    parts = prog.split()
    for action in parser._actions:  # argparse exposes no public list of a parser's actions
        if not action.option_strings or action.dest == "help":
            continue
        value = getattr(args, action.dest, action.default)
        if value == action.default:
            continue
        flag = max(action.option_strings, key=len)
        if action.nargs == 0:
            parts.append(flag)
        elif isinstance(value, (list, tuple)) and action.nargs is not None:
            parts += [flag, *map(str, value)]
        elif isinstance(value, (list, tuple)):  # one argument that its `type` parsed into a list
            parts += [flag, ",".join(map(str, value))]
        else:
            parts += [flag, str(value)]
    return shlex.join(parts)


def cpu_features() -> list[str]:
    """The SIMD features that decide matmul speed on CPU (AVX-512 BF16 makes bf16 fast)."""
    try:
        flags = set()
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        return []
    return [f for f in _CPU_FEATURES if f in flags]


def machine() -> dict[str, Any]:
    import torch

    return {
        "cpu": cpu_model(),
        "cpu_features": cpu_features(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "ram_bytes": total_ram_bytes(),
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def git_commit() -> str | None:
    """The kvserve source tree's commit (with ``-dirty`` when it has local changes), if it is a git checkout."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def run_context(command: str) -> dict[str, Any]:
    """Date, command, machine and load at the start of a run."""
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "machine": machine(),
        "kvserve_commit": git_commit(),
        "load_average_1min_start": load_average(),
    }


def describe_machine(context: dict[str, Any]) -> str:
    m = context["machine"]
    features = ", ".join(m["cpu_features"]) or "no SIMD flags found"
    return f"{m['cpu']} ({features}), {m['torch_threads']} torch threads, torch {m['torch']}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def times(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}×"


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def text_table(header: list[str], rows: list[list[str]]) -> str:
    """Columns aligned with spaces, for the terminal."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows])


def load_span(context: dict[str, Any]) -> str:
    """``0.42→0.55``: the 1-minute load average at the start and the end of the run."""
    start, end = context.get("load_average_1min_start"), context.get("load_average_1min_end")
    if start is None or end is None:
        return "n/a"
    return f"{start:.2f}→{end:.2f}"
