"""The hardware floor a benchmark result is measured against.

The machine's read bandwidth and matmul FLOP/s come from
:func:`kvserve.estimate.hardware.measure_local_hardware` (measured once, cached,
shared with ``kvserve estimate``); the parameter count is exact, from the model's
config. Two floors, as in docs/DESIGN.md's performance method:

- compute: a workload of ``T`` tokens (prompt + output) needs at least
  ``2 · params · T`` FLOPs, so it takes at least ``2 · params · T / FLOP/s``;
- bandwidth: one single-stream decode step reads every weight and the sequence's
  KV cache, so it takes at least ``(weight bytes + context · KV bytes per token) / bandwidth``.
  The weight bytes are those the engine holds (GGUF blocks or int8/int4 where it runs them
  quantized, a draft model's too) when the benchmark passes them, else parameters × dtype size.

A result's *fraction of the floor* is ``floor time / measured time`` (1.0 would be
the machine's limit).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kvserve.estimate.hardware import Hardware, measure_local_hardware
from kvserve.estimate.model_shape import ModelShape
from kvserve.estimate.roofline import COMPUTE_DTYPES, kv_bytes_per_token, normalize_dtype, weight_bytes


@dataclass(frozen=True)
class HardwareFloor:
    hardware: Hardware
    dtype: str
    num_params: int
    weight_bytes: int
    kv_bytes_per_token: int

    @property
    def flops(self) -> float | None:
        """Measured matmul FLOP/s for this dtype; None where the machine has no measurement for it."""
        return self.hardware.peak_flops.get(self.dtype)

    @property
    def bandwidth(self) -> float:
        return self.hardware.memory_bandwidth

    def compute_seconds(self, num_tokens: int) -> float | None:
        """``2 · params · num_tokens / FLOP/s``."""
        return None if self.flops is None else 2 * self.num_params * num_tokens / self.flops

    def decode_step_seconds(self, context_len: float) -> float:
        """One single-stream decode step over ``context_len`` cached tokens: the bytes it must read / bandwidth."""
        return (self.weight_bytes + context_len * self.kv_bytes_per_token) / self.bandwidth

    def prefill_seconds(self, prompt_len: int) -> float | None:
        """A ``prompt_len``-token prefill: the larger of reading the weights once and its matmul FLOPs."""
        compute = self.compute_seconds(prompt_len)
        return None if compute is None else max(self.weight_bytes / self.bandwidth, compute)

    def to_dict(self) -> dict[str, Any]:
        return {
            "dtype": self.dtype,
            "num_params": self.num_params,
            "weight_bytes": self.weight_bytes,
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "memory_bandwidth_bytes_per_s": self.bandwidth,
            "matmul_flops_per_s": self.flops,
            "hardware": self.hardware.to_dict(),
        }


def local_hardware(remeasure: bool = False) -> Hardware:
    """This machine's measured numbers (cached).

    Call it before loading any model: measured inside a process that has just
    loaded and run a model, the matmul rate came out at less than half of a fresh
    process's on the 2-core machine of docs/PERFORMANCE.md.
    """
    return measure_local_hardware(force=remeasure)


def hardware_floor(hf_config: Any, torch_dtype: torch.dtype, hardware: Hardware,
                   held_weight_bytes: int | None = None) -> HardwareFloor:
    """The floor for a model (its Hugging Face config) running in ``torch_dtype`` on ``hardware``;
    ``held_weight_bytes``: the bytes of weights the engine holds (its `WorkerInfo.weight_bytes`), which a
    quantized model reads instead of parameters × dtype size."""
    shape = ModelShape.from_config(hf_config)
    dtype = normalize_dtype(str(torch_dtype).removeprefix("torch."), "dtype", COMPUTE_DTYPES)
    return HardwareFloor(
        hardware=hardware,
        dtype=dtype,
        num_params=shape.num_params,
        weight_bytes=held_weight_bytes or weight_bytes(shape.num_params, dtype),
        kv_bytes_per_token=kv_bytes_per_token(shape, dtype),
    )


def fraction(floor_seconds: float | None, measured_seconds: float) -> float | None:
    """``floor / measured``; None when there is no floor (or nothing was measured)."""
    if floor_seconds is None or measured_seconds <= 0:
        return None
    return floor_seconds / measured_seconds
