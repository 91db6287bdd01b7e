"""Memory, concurrency and roofline-latency estimates (``kvserve estimate``)."""

from kvserve.estimate.hardware import HARDWARE, Hardware, get_hardware, measure_local_hardware
from kvserve.estimate.model_shape import ModelShape
from kvserve.estimate.presets import PRESETS, get_preset
from kvserve.estimate.roofline import Estimate, EstimateParams, StepFloor, estimate
from kvserve.estimate.shape_loader import load_model_shape

__all__ = [
    "HARDWARE", "PRESETS", "Estimate", "EstimateParams", "Hardware", "ModelShape", "StepFloor",
    "estimate", "get_hardware", "get_preset", "load_model_shape", "measure_local_hardware",
]
