"""A Llama decoder layer as one C++ call on CPU (src/kvserve/csrc/llama_layer.cpp).

At decode, the layer's ~10 kernel calls and ~11 module calls cost ~300 us of Python and
dispatch per layer, as much as streaming its weights. `CpuLlamaLayer` runs the same
kernels in the same order in one call. The kernel plan (models/kernel_plan.py) asks
`cpu_layer_for` for every layer, which decides whether its pieces all have CPU kernels
(fp32/bf16 weights, the CPU attention backend, the linear kernel, SiLU, no q/k norm); the KV
cache may be in any `--kv-cache-dtype` (the C++ side quantizes and reads int8 / fp8 itself);
the layer then asks it whether it `accepts` each step: steps of more than `max_rows`
tokens (prefill chunks) go through the modules as before.

`LayerArgs` (one layer's weights, cache and shapes) and `StepArgs` (the step: positions, slots, block
tables; one per model, `SharedStep`, set once per step for all its layers) mirror the C++ structs by hand;
`load()` compares each with the layout the library reports (`layout_differences`) and refuses the
library, with a warning, where they differ.
"""

from __future__ import annotations

import ctypes
import logging
from functools import lru_cache
from itertools import zip_longest

import torch

from kvserve import native
from kvserve.attention import cpu as cpu_attention
from kvserve.attention.kv_cache import KVCache
from kvserve.attention.metadata import AttentionMetadata
from kvserve.layers import cpu_pointwise, cpu_quant
from kvserve.layers.linear import Linear
from kvserve.models.llama import LlamaDecoderLayer

logger = logging.getLogger(__name__)

_i64, _p = ctypes.c_int64, ctypes.c_void_p
_ENTRY = {torch.float32: "llama_layer_f32", torch.bfloat16: "llama_layer_bf16"}
_KV_FORMAT = {"auto": 0, "int8": 1, "fp8_e4m3": 2}  # LayerArgs.kv_format
# Up to this many tokens per step: decode-sized batches (max_num_seqs is 256 by default), where the
# modules' per-call overhead matters: with the SiLU fused into the down projection as in the modules,
# decode steps of SmolLM2 in bf16 at batch 64/128/256 took 106-109/190-200/337-354 ms in one call
# against 111-114/200-206/345-366 through the modules (interleaved). Prefill chunks (up to 2,048
# tokens) stay with the modules, whose last layer computes only the rows whose logits are used;
# fp32 stops at the linear kernel's 48 rows (MKL beyond).
MAX_ROWS = 256


class LayerArgs(ctypes.Structure):
    """Mirror of `LayerArgs` in llama_layer.cpp (same order, same types; `load()` checks it): one layer."""

    _fields_ = [
        *((name, _p) for name in ("input_norm", "qkv_w", "qkv_b", "o_w", "o_b", "post_norm",
                                  "gate_up_w", "gate_up_b", "down_w", "down_b", "cos", "sin",
                                  "k_cache", "v_cache", "k_scale", "v_scale")),
        ("kv_format", _i64),
        *((name, _i64) for name in ("hidden", "num_heads", "num_kv_heads", "head_dim", "inner", "block_size")),
        ("query_tile", _i64),
        ("split_len", _i64),
        ("sliding_window", _i64),
        *((name, _i64) for name in ("qkv_format", "o_format", "gate_up_format", "down_format")),
        ("eps", ctypes.c_float),
        ("scale", ctypes.c_float),
    ]


class StepArgs(ctypes.Structure):
    """Mirror of `StepArgs` in llama_layer.cpp (checked by `load()` too): the step, the same for every layer."""

    _fields_ = [
        ("positions", _p),
        ("slot_mapping", _p),
        ("block_tables", _p),
        ("max_blocks", _i64),
        ("seq_lens", _p),
        ("query_start_loc", _p),
        ("num_seqs", _i64),
        ("tokens", _i64),
        ("num_threads", ctypes.c_int),
    ]


class SharedStep:
    """One model's `StepArgs`, filled by the first of its layers called with a step's tensors and read by the
    others: with the fields set on every layer's struct the Python around a layer call took 7.1 us, with them
    shared 4.0 (SmolLM2's 30 layers: 0.1 ms a step). It holds the step's tensors, so the pointers stay valid while it can
    hand them out."""

    def __init__(self) -> None:
        self.args = StepArgs()
        self.key: tuple[torch.Tensor, AttentionMetadata] | None = None

    def of(self, positions: torch.Tensor, meta: AttentionMetadata) -> StepArgs:
        key = self.key
        if key is None or key[0] is not positions or key[1] is not meta:
            s = self.args
            s.positions, s.slot_mapping = positions.data_ptr(), meta.slot_mapping.data_ptr()
            s.block_tables, s.max_blocks = meta.block_tables.data_ptr(), meta.block_tables.shape[1]
            s.seq_lens, s.query_start_loc, s.num_seqs = meta.seq_lens.data_ptr(), meta.query_start_loc.data_ptr(), meta.seq_lens.shape[0]
            s.tokens, s.num_threads = positions.shape[0], torch.get_num_threads()
            self.key = (positions, meta)
        return self.args


@lru_cache(maxsize=1)
def load() -> ctypes.CDLL | None:
    """The compiled layer library, or None (with a logged warning) when it cannot be built or its
    `LayerArgs` is laid out differently from ours (then every layer runs through the modules)."""
    argtypes = [ctypes.POINTER(LayerArgs), ctypes.POINTER(StepArgs), _p, _p, ctypes.c_int, _p]
    lib = native.load("llama_layer.cpp", {name: argtypes for name in _ENTRY.values()})
    if lib is None:
        return None
    for structure, layout_fn in ((LayerArgs, "llama_layer_args_layout"), (StepArgs, "llama_step_args_layout")):
        differences = layout_differences(lib, structure, layout_fn)
        if differences:
            logger.warning("the one-call layer is off: %s in llama_layer.cpp and llama_cpu_layer.py differ (%s)",
                           structure.__name__, "; ".join(differences))
            return None
    return lib


def layout_differences(lib: ctypes.CDLL, structure: type[ctypes.Structure] = LayerArgs,
                       layout_fn: str = "llama_layer_args_layout") -> list[str]:
    """How `structure` differs from the C++ struct whose layout `lib`'s `layout_fn` reports: its size, the first
    field whose name differs (declaration order), else every field at another offset or of another size.
    Empty when they agree."""
    fn = getattr(lib, layout_fn)
    fn.argtypes, fn.restype = [ctypes.POINTER(_i64), _i64], ctypes.c_char_p
    names = [field[0] for field in structure._fields_]
    layout = (_i64 * (1 + 2 * len(names)))()
    cpp_names = fn(layout, len(layout)).decode().split()
    differences = []
    if layout[0] != ctypes.sizeof(structure):
        differences.append(f"size {layout[0]} in C++, {ctypes.sizeof(structure)} here")
    for i, (cpp, ours) in enumerate(zip_longest(cpp_names, names)):
        if cpp != ours:
            return [*differences, f"field {i} is {cpp} in C++, {ours} here"]
    for i, name in enumerate(names):
        field = getattr(structure, name)
        if (layout[1 + 2 * i], layout[2 + 2 * i]) != (field.offset, field.size):
            differences.append(f"{name} at offset {layout[1 + 2 * i]} size {layout[2 + 2 * i]} in C++, "
                               f"offset {field.offset} size {field.size} here")
    return differences


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _weight(linear: Linear) -> tuple[torch.Tensor, int]:
    """The tensor a projection's weight pointer points into, and its format for LayerArgs (0: dense)."""
    if linear.quantized is None:
        return linear.weight, 0
    (_, packed), = linear.quantized.parts
    return packed.blocks, packed.format


def _runs_in_one_call(linear: Linear) -> bool:
    """A dense weight with the C++ kernel, or a weight in one GGUF block format the block kernels read."""
    if linear.quantized is None:
        return linear.kernel is not None
    return len(linear.quantized.parts) == 1 and cpu_quant.load() is not None


class CpuLlamaLayer:
    """Runs `layer` for up to `max_rows` tokens in one C++ call (made by `cpu_layer_for`)."""

    def __init__(self, layer: LlamaDecoderLayer, fn: ctypes._CFuncPtr, max_rows: int, step: SharedStep,
                 kv_cache_dtype: str = "auto") -> None:
        attn, mlp = layer.self_attn, layer.mlp
        self.fn = fn
        self.max_rows = max_rows
        self.step = step  # shared by the model's layers
        self.kv_cache: KVCache | None = None  # the cache `args` points into
        (qkv_w, qkv_f), (o_w, o_f), (gate_up_w, gate_up_f), (down_w, down_f) = (
            _weight(lin) for lin in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
        )
        self.args = LayerArgs(
            input_norm=_ptr(layer.input_layernorm.weight), qkv_w=_ptr(qkv_w), qkv_b=_ptr(attn.qkv_proj.bias),
            o_w=_ptr(o_w), o_b=_ptr(attn.o_proj.bias), post_norm=_ptr(layer.post_attention_layernorm.weight),
            gate_up_w=_ptr(gate_up_w), gate_up_b=_ptr(mlp.gate_up_proj.bias),
            down_w=_ptr(down_w), down_b=_ptr(mlp.down_proj.bias),
            cos=_ptr(attn.rotary.cos), sin=_ptr(attn.rotary.sin),
            hidden=attn.o_proj.out_features, num_heads=attn.num_heads, num_kv_heads=attn.num_kv_heads,
            head_dim=attn.head_dim, inner=mlp.down_proj.in_features,
            query_tile=cpu_attention.QUERY_TILE, split_len=cpu_attention.SPLIT_LEN,
            sliding_window=attn.attn.sliding_window or 0,
            qkv_format=qkv_f, o_format=o_f, gate_up_format=gate_up_f, down_format=down_f,
            eps=layer.input_layernorm.eps, scale=attn.attn.scale, kv_format=_KV_FORMAT[kv_cache_dtype],
        )
        # the tensors `args` points into
        self.keep_alive = [*layer.parameters(), qkv_w, o_w, gate_up_w, down_w, attn.rotary.cos, attn.rotary.sin]

    def accepts(self, x: torch.Tensor, positions: torch.Tensor) -> bool:
        """Whether this step can run in one call: decode-sized, with the runner's int64 positions."""
        return x.shape[0] <= self.max_rows and positions.dtype == torch.int64

    def __call__(
        self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None,
        kv_cache: KVCache, meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Same contract as LlamaDecoderLayer.forward; positions and the metadata are int64 (the runner's)."""
        a = self.args
        if kv_cache is not self.kv_cache:  # the same cache every step: pointed at once
            k_cache, v_cache, k_scale, v_scale = kv_cache
            a.k_cache, a.v_cache, a.block_size = k_cache.data_ptr(), v_cache.data_ptr(), k_cache.shape[1]
            a.k_scale, a.v_scale = _ptr(k_scale), _ptr(v_scale)
            self.kv_cache = kv_cache
        step = self.step.of(positions, meta)
        x = x.contiguous()
        first = residual is None
        if first:
            residual = torch.empty_like(x)
        out = torch.empty_like(x)
        self.fn(ctypes.byref(a), ctypes.byref(step), x.data_ptr(), residual.data_ptr(), int(first), out.data_ptr())
        return out, residual


def cpu_layer_for(layer: LlamaDecoderLayer, dtype: torch.dtype, step: SharedStep,
                  kv_cache_dtype: str = "auto") -> CpuLlamaLayer | None:
    """The one-call layer for `layer`, or None where a piece of it has no C++ kernel: the attention
    backend and the four linears' kernels must be installed already (models/kernel_plan.py).
    `step`: the model's SharedStep, which all its layers share; `kv_cache_dtype`: the format of the caches it
    will be given (auto | int8 | fp8_e4m3)."""
    attn, mlp = layer.self_attn, layer.mlp
    linears = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
    eligible = (
        dtype in _ENTRY
        and all(_runs_in_one_call(lin) for lin in linears)
        and isinstance(attn.attn.backend, cpu_attention.CpuBackend)
        and attn.q_norm is None
        and attn.attn.streaming is None  # positions past the rotary table, and the sinks' second query
        and all(p.device.type == "cpu" and p.is_contiguous() and p.dtype == dtype for p in layer.parameters())
        and attn.rotary.cos.dtype == torch.float32
    )
    lib = load() if eligible and cpu_pointwise.load() is not None else None
    if lib is None:
        return None
    max_rows = min([MAX_ROWS, *(lin.kernel.max_rows for lin in linears if lin.kernel is not None)])
    return CpuLlamaLayer(layer, getattr(lib, _ENTRY[dtype]), max_rows, step, kv_cache_dtype)
