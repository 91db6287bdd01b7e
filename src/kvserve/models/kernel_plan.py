"""Install every fast path of a loaded model in one pass, and say what was chosen: the `KernelPlan`.

Three decisions, made once after the weights are loaded (their dtype, device and layout decide, and
the KV cache's format, `--kv-cache-dtype`):

1. the attention backend of every `Attention` (attention/selector.py);
2. the C++ matmul kernel of every `Linear` (layers/cpu_linear.py), by the weights' dtype;
3. the one-call C++ layer of every `LlamaDecoderLayer` whose pieces all run in C++
   (models/llama_cpu_layer.py decides which; it needs 1 and 2 installed first).

The loader logs the plan at start-up and keeps it as `model.kernel_plan`; benchmarks report it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kvserve import native
from kvserve.attention import cpu as cpu_attention
from kvserve.attention.kv_quant import describe as describe_kv_cache
from kvserve.attention.selector import select_backend
from kvserve.layers import cpu_linear, cpu_quant
from kvserve.layers.attention import Attention
from kvserve.layers.linear import Linear
from kvserve.models import llama_cpu_layer
from kvserve.models.llama import LlamaDecoderLayer


@dataclass(frozen=True)
class KernelPlan:
    """What `install_kernels` installed. Row limits are 0 where nothing got the fast path."""

    attention_backend: str  # reference | cpu | triton
    attention_layers: int
    linear_kernels: int  # Linears with the dense C++ kernel
    linears: int
    packed_linears: int  # Linears multiplying on GGUF blocks (layers/quantized_linear.py)
    packed_formats: tuple[str, ...]
    linear_max_rows: int  # the most rows a Linear sends to the kernel (cpu_linear.NO_LIMIT: every count)
    one_call_layers: int  # decoder layers that run as one C++ call
    decoder_layers: int
    one_call_max_rows: int  # the most tokens a step may have to run in one call
    dtype: torch.dtype
    device: str
    isa: str | None  # what the C++ kernels in use were compiled for; None where none is used
    march: str  # the -march they were built with (KVSERVE_MARCH, default native)
    kv_cache_dtype: str = "auto"  # the KV cache's format (attention/kv_quant.py)

    def describe(self) -> str:
        """One line for the start-up log."""
        kernels = f"C++ kernels: {self.isa} (-march={self.march})" if self.isa else "no C++ kernels"
        return (
            f"attention: {self.attention_backend} ({self.attention_layers} layers); linear: {self.describe_linear()}; "
            f"one call: {self.describe_one_call()}; {str(self.dtype).removeprefix('torch.')} on {self.device}; "
            f"KV cache: {describe_kv_cache(self.kv_cache_dtype, self.dtype)}; {kernels}"
        )

    def describe_linear(self) -> str:
        """Which Linears multiply on GGUF blocks, which use the dense C++ kernel and for how many rows."""
        parts = []
        if self.packed_linears:
            parts.append(f"GGUF blocks ({', '.join(self.packed_formats)}) in {self.packed_linears}/{self.linears} layers")
        if self.linear_kernels:
            limit = self.linear_max_rows
            rows = "all row counts" if limit >= cpu_linear.NO_LIMIT else f"up to {limit} rows, torch above"
            parts.append(f"C++ kernel for {rows} in {self.linear_kernels}/{self.linears} layers")
        return "; ".join(parts) or "torch"

    def describe_one_call(self) -> str:
        """Which decoder layers run as one C++ call, and for steps of how many tokens."""
        if not self.one_call_layers:
            return "none (modules)"
        return f"{self.one_call_layers}/{self.decoder_layers} layers for steps of <= {self.one_call_max_rows} tokens"


def install_kernels(
    model: nn.Module, dtype: torch.dtype, device: str, attention_backend: str = "auto", linear_backend: str = "auto",
    kv_cache_dtype: str = "auto", tp_size: int = 1,
) -> KernelPlan:
    """Give `model`'s modules their fast paths and return what they got. Call after the weights are loaded.

    `attention_backend`: auto | reference | cpu | triton (see `select_backend`). `linear_backend`:
    "auto" uses the C++ kernel wherever it builds for the weights, "torch" never, "cpu" insists
    (ValueError where no Linear can have it). `device` is a device type: cpu or cuda. `kv_cache_dtype`:
    the format of the KV cache the model will be given (auto | int8 | fp8_e4m3). Under tensor parallelism
    (`tp_size` > 1) no layer runs as one call: its projections need all-reduces between the kernels.
    """
    modules = list(model.modules())
    attentions = [m for m in modules if isinstance(m, Attention)]
    linears = [m for m in modules if isinstance(m, Linear)]
    decoder_layers = [m for m in modules if isinstance(m, LlamaDecoderLayer)]

    backend = select_backend(attention_backend, device)
    for attention in attentions:
        attention.backend = backend

    dense = [linear for linear in linears if linear.quantized is None]
    packed = [linear for linear in linears if linear.quantized is not None]
    for linear in dense:
        linear.kernel = None if linear_backend == "torch" else cpu_linear.cpu_linear_kernel(dtype, linear.weight)
    kernels = [linear.kernel for linear in dense if linear.kernel is not None]
    if linear_backend == "cpu" and dense and not kernels:
        raise ValueError("linear_backend 'cpu' was asked for, but its kernel is unavailable for this model "
                         "(CPU, float32/bfloat16 only; see any warning above)")

    step = llama_cpu_layer.SharedStep()  # the step's fields, set once per step for all the model's layers
    cpu_layers = [llama_cpu_layer.cpu_layer_for(layer, dtype, step, kv_cache_dtype) if tp_size == 1 else None
                  for layer in decoder_layers]
    for layer, cpu_layer in zip(decoder_layers, cpu_layers):
        layer.cpu_layer = cpu_layer
    one_call = [cpu_layer for cpu_layer in cpu_layers if cpu_layer is not None]

    libraries = [
        cpu_attention.load() if attentions and isinstance(backend, cpu_attention.CpuBackend) else None,
        cpu_linear.load() if kernels else None,
        cpu_quant.load() if packed else None,
        llama_cpu_layer.load() if one_call else None,
    ]
    library = next((lib for lib in libraries if lib is not None), None)
    return KernelPlan(
        attention_backend=backend.name,
        attention_layers=len(attentions),
        linear_kernels=len(kernels),
        linears=len(linears),
        packed_linears=len(packed),
        packed_formats=tuple(sorted({name for linear in packed for name in linear.quantized.formats})),
        linear_max_rows=max((kernel.max_rows for kernel in kernels), default=0),
        one_call_layers=len(one_call),
        decoder_layers=len(decoder_layers),
        one_call_max_rows=max((layer.max_rows for layer in one_call), default=0),
        dtype=dtype,
        device=device,
        isa=None if library is None else native.compiled_isa(library),
        march=native.march(),
        kv_cache_dtype=kv_cache_dtype,
    )
