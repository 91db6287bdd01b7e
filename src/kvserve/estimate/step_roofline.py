"""Where one engine step sits on the machine's roofline (the live dashboard's roofline chart).

A step of T tokens does, by the estimator's rules (roofline.py), ``2·P·T`` matmul FLOPs plus
``4·layers·q_size`` per (query, key) pair of attention, and reads every weight once plus the K/V
of the keys its attention reads. Its arithmetic intensity is FLOPs / bytes; what it achieved is
FLOPs (or bytes) per second of its measured duration. The roof is the machine's: its memory
bandwidth (the slanted line, bytes/s × intensity) and its peak FLOP/s (the flat one), measured
on a CPU (hardware.py, cached), looked up in the datasheet table for a known GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvserve.estimate.hardware import HARDWARE, Hardware, measure_local_hardware
from kvserve.estimate.model_shape import ModelShape
from kvserve.estimate.roofline import COMPUTE_DTYPES, attention_flops_per_token, normalize_dtype


@dataclass(frozen=True)
class StepRoofline:
    shape: ModelShape
    weight_bytes: int  # as the model holds them (packed GGUF blocks count as stored)
    kv_bytes_per_token: int
    hardware: Hardware | None  # None: no floors known for this device (the point is still placed)
    dtype: str  # the compute dtype whose peak FLOP/s is the flat roof

    def step_flops(self, num_tokens: int, num_attention_pairs: int) -> float:
        return 2.0 * self.shape.num_params * num_tokens + attention_flops_per_token(self.shape, num_attention_pairs)

    def step_bytes(self, num_context_tokens: int) -> float:
        return float(self.weight_bytes + num_context_tokens * self.kv_bytes_per_token)

    @property
    def peak_flops(self) -> float | None:
        return None if self.hardware is None else self.hardware.peak_flops.get(self.dtype)

    @property
    def bandwidth(self) -> float | None:
        return None if self.hardware is None else self.hardware.memory_bandwidth

    def roof(self) -> dict[str, Any]:
        """The roof as plain data: bytes/s, FLOP/s (None where unknown) and which machine they describe."""
        return {
            "bandwidth": self.bandwidth, "peak_flops": self.peak_flops, "dtype": self.dtype,
            "hardware": None if self.hardware is None else self.hardware.description,
        }


def device_hardware(device: str) -> Hardware | None:
    """This CPU, measured (once, cached); a GPU from the datasheet table when its name matches one, else None."""
    if device == "cpu":
        return measure_local_hardware()
    import torch

    name = torch.cuda.get_device_name(torch.device(device)).lower()
    return next((h for key, h in HARDWARE.items() if key.split("-")[0] in name), None)


def step_roofline(hf_config: Any, weight_bytes: int, kv_bytes_per_token: int, torch_dtype: Any, device: str) -> StepRoofline:
    dtype = normalize_dtype(str(torch_dtype).removeprefix("torch."), "dtype", COMPUTE_DTYPES)
    return StepRoofline(ModelShape.from_config(hf_config), weight_bytes, kv_bytes_per_token, device_hardware(device), dtype)
