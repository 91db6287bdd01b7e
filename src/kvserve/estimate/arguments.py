"""The ``kvserve estimate`` options as values: byte sizes and the :class:`EstimateParams` they spell.

Shared by the estimate (:mod:`kvserve.estimate.cli`) and its check against the
engine (:mod:`kvserve.estimate.validate`).
"""

from __future__ import annotations

import argparse

from kvserve.estimate.roofline import EstimateParams
from kvserve.validation import parse_bytes

def estimate_params_from_args(args: argparse.Namespace) -> EstimateParams:
    """The :class:`EstimateParams` the command-line options spell."""
    return EstimateParams(
        dtype=args.dtype, weights_dtype=args.weights_dtype, kv_dtype=args.kv_dtype,
        num_devices=args.num_devices, input_len=args.input_len,
        output_len=args.output_len, batch=args.batch,
        memory_fraction=args.memory_fraction, weight_overhead=args.weight_overhead,
        block_size=args.block_size,
        kv_bytes_per_token=_optional_bytes(args.kv_bytes_per_token, "kv_bytes_per_token"),
        device_memory_bytes=_optional_bytes(args.device_memory, "device_memory"),
        kv_cache_memory_bytes=_optional_bytes(args.kv_cache_memory_bytes,
                                              "kv_cache_memory_bytes"),
        sliding_window=args.sliding_window, attention_sinks=args.attention_sinks,
    )


def _optional_bytes(text: str | None, parameter: str) -> float | None:
    return None if text is None else parse_bytes(text, parameter)
