"""What every ``kvserve estimate`` report shares: the header that reproduces it, and how times read.

Used by the estimate table (:mod:`kvserve.estimate.cli`) and by the predicted-vs-measured
table of ``--validate`` (:mod:`kvserve.estimate.validate`).
"""

from __future__ import annotations

import argparse
import platform
import shlex
from datetime import datetime

from kvserve.estimate.hardware import cpu_model

# The destinations of the options of kvserve.estimate.cli.add_estimate_arguments, in the order a
# command line spells them.
_OPTIONS = ("model", "config", "preset", "hardware", "num_devices", "dtype", "weights_dtype",
            "kv_dtype", "input_len", "output_len", "batch", "memory_fraction", "weight_overhead",
            "block_size", "kv_bytes_per_token", "device_memory", "kv_cache_memory_bytes",
            "validate", "load_format", "validate_batches", "validate_context", "json")


def report_meta(args: argparse.Namespace) -> dict[str, str]:
    """What every report starts with: the command that reproduces it, the date, the machine."""
    return {"command": command_line(args),
            "date": datetime.now().astimezone().isoformat(timespec="seconds"),
            "machine": f"{platform.node()} ({cpu_model()})"}


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this estimate, every option spelled out."""
    words = ["kvserve", "estimate"]
    for key in _OPTIONS:
        value = getattr(args, key, None)
        if value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        words += [flag] if value is True else [flag, str(value)]
    return shlex.join(words)


def format_seconds(seconds: float) -> str:
    """``0.0123`` → ``"12.30 ms"``: the largest unit of s, ms and µs (else ns) that is at most ``seconds``."""
    if seconds == 0:
        return "0"
    for unit, scale in (("s", 1), ("ms", 1e-3), ("µs", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:,.2f} {unit}"
    return f"{seconds / 1e-9:,.1f} ns"
