"""The shape of a decoder-only model, and its exact parameter count.

A ``ModelShape`` holds only what the estimates need: layer count, widths, head
counts, vocabulary, the few flags (biases, tied embeddings, q/k norms) that
change the parameter count, and each layer's sliding attention window where the
model has one (which bounds the keys a query reads, and, on every layer, the KV
cache a sequence holds). It is built from a Hugging Face config (object,
dict, ``config.json`` path or model directory); the named ones are in
:mod:`kvserve.estimate.presets`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal
from collections.abc import Mapping

from kvserve.attention.sliding_window import block_window, layer_windows

Architecture = Literal["llama", "gpt2"]

# HF ``model_type`` values whose parameters follow the llama layout: gated MLP
# (gate/up/down), RMSNorm with a weight only, rotary positions (no position table).
LLAMA_STYLE_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED_MODEL_TYPES = (*LLAMA_STYLE_MODEL_TYPES, "gpt2")


@dataclass(frozen=True)
class ModelShape:
    """Shapes of a decoder-only transformer.

    ``architecture`` is ``"llama"`` for llama-style blocks (gated SiLU MLP with
    three matrices, RMSNorm, rotary embeddings) or ``"gpt2"`` (two-matrix GELU
    MLP with biases, LayerNorm with bias, learned position table).
    """

    name: str
    architecture: Architecture
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    max_position_embeddings: int = 2048
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    model_type: str = ""
    dtype: str | None = None
    layer_windows: tuple[int | None, ...] = ()  # each layer's sliding window (None: full attention); () for none

    def __post_init__(self) -> None:
        if self.architecture not in ("llama", "gpt2"):
            raise ValueError(
                f"architecture: got {self.architecture!r}; allowed values are 'llama', 'gpt2'"
            )
        for field in ("num_layers", "hidden_size", "num_heads", "num_kv_heads",
                      "head_dim", "intermediate_size", "vocab_size"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{field}: got {value!r}; must be an integer >= 1")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_kv_heads: got {self.num_kv_heads}; must divide num_heads={self.num_heads}"
            )
        if self.layer_windows and (len(self.layer_windows) != self.num_layers or any(
                w is not None and (not isinstance(w, int) or w < 1) for w in self.layer_windows)):
            raise ValueError(f"layer_windows: got {self.layer_windows!r}; must be empty or one window per layer "
                             f"({self.num_layers}), each an integer >= 1 or None")
        if self.architecture == "gpt2" and self.num_kv_heads != self.num_heads:
            raise ValueError(
                f"num_kv_heads: got {self.num_kv_heads}; gpt2 uses multi-head attention, "
                f"so it must equal num_heads={self.num_heads}"
            )

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def attention_kind(self) -> str:
        """``MHA``, ``GQA`` or ``MQA``, from the number of key/value heads."""
        if self.num_kv_heads == self.num_heads:
            return "MHA"
        return "MQA" if self.num_kv_heads == 1 else "GQA"

    @property
    def kv_window(self) -> int | None:
        """The window behind which kvserve frees a sequence's KV blocks: the widest layer's when every layer
        has one, else None (every token's K/V stay)."""
        return block_window(list(self.layer_windows))

    def attended_len(self, context_len: float) -> float:
        """Keys a query with ``context_len`` keys behind it reads, averaged over the layers: ``min(context, W)``
        in a layer with window W, the whole context in the others."""
        if not self.layer_windows:
            return context_len
        return sum(context_len if w is None else min(context_len, w) for w in self.layer_windows) / self.num_layers

    def param_breakdown(self) -> dict[str, int]:
        """Exact parameter count per part, counting every weight, bias and norm."""
        if self.architecture == "gpt2":
            return self._gpt2_breakdown()
        return self._llama_breakdown()

    @property
    def num_params(self) -> int:
        """Exact parameter count, as ``sum(p.numel() for p in model.parameters())``."""
        return sum(self.param_breakdown().values())

    @property
    def approx_num_params(self) -> int:
        """The write-ups' approximation ``12·n·h² + V·h``.

        ``12h²`` per layer is ``4h²`` for Q, K, V, O plus ``8h²`` for an MLP of width
        ``4h`` (or a gated MLP of width ``8h/3``); it ignores GQA, biases and norms.
        """
        return 12 * self.num_layers * self.hidden_size**2 + self.vocab_size * self.hidden_size

    def _llama_breakdown(self) -> dict[str, int]:
        h, layers = self.hidden_size, self.num_layers
        attention = h * self.q_size + 2 * h * self.kv_size + self.q_size * h
        if self.qkv_bias:
            attention += self.q_size + 2 * self.kv_size
        if self.o_bias:
            attention += h
        mlp = 3 * h * self.intermediate_size
        if self.mlp_bias:
            mlp += 2 * self.intermediate_size + h
        norms = 2 * h + (2 * self.head_dim if self.qk_norm else 0)
        return {
            "embedding": self.vocab_size * h,
            "attention": layers * attention,
            "mlp": layers * mlp,
            "norms": layers * norms + h,
            "lm_head": 0 if self.tie_word_embeddings else self.vocab_size * h,
        }

    def _gpt2_breakdown(self) -> dict[str, int]:
        h, layers, inner = self.hidden_size, self.num_layers, self.intermediate_size
        return {
            "embedding": self.vocab_size * h + self.max_position_embeddings * h,
            "attention": layers * (3 * h * h + 3 * h + h * h + h),
            "mlp": layers * (2 * h * inner + inner + h),
            "norms": layers * 4 * h + 2 * h,
            "lm_head": 0 if self.tie_word_embeddings else self.vocab_size * h,
        }

    def with_kv_heads(self, num_kv_heads: int, name: str | None = None) -> ModelShape:
        """The same model with a different number of key/value heads (MHA ↔ GQA ↔ MQA)."""
        return replace(self, num_kv_heads=num_kv_heads, name=name or self.name)

    @classmethod
    def from_config(cls, config: Any, name: str | None = None) -> ModelShape:
        """Build from a Hugging Face config object (``PretrainedConfig``) or its dict."""
        data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        model_type = data.get("model_type", "")
        label = name or data.get("_name_or_path") or model_type or "model"
        if model_type == "gpt2":
            return _gpt2_from_dict(data, label)
        if model_type in LLAMA_STYLE_MODEL_TYPES:
            return _llama_from_dict(data, label, model_type)
        raise ValueError(
            f"config: model_type {model_type!r} is not supported; "
            f"allowed values are {', '.join(SUPPORTED_MODEL_TYPES)}"
        )

    @classmethod
    def from_config_file(cls, path: str | Path) -> ModelShape:
        """Build from a ``config.json`` file."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config: file {str(path)!r} does not exist")
        with path.open() as f:
            data = json.load(f)
        return cls.from_config(data, name=path.parent.name or path.name)

    @classmethod
    def from_model_dir(cls, path: str | Path) -> ModelShape:
        """Build from a model directory holding a ``config.json``."""
        path = Path(path)
        if not (path / "config.json").is_file():
            raise ValueError(f"model: directory {str(path)!r} has no config.json")
        return cls.from_config_file(path / "config.json")


def _require(data: Mapping[str, Any], key: str) -> Any:
    if data.get(key) is None:
        raise ValueError(f"config: missing required field {key!r}")
    return data[key]


def _config_dtype(data: Mapping[str, Any]) -> str | None:
    dtype = data.get("torch_dtype") or data.get("dtype")
    return str(dtype) if dtype is not None else None


def _llama_from_dict(data: Mapping[str, Any], name: str, model_type: str) -> ModelShape:
    hidden = _require(data, "hidden_size")
    heads = _require(data, "num_attention_heads")
    attention_bias = bool(data.get("attention_bias", False))
    # Qwen2 always has q/k/v biases and no o_proj bias; elsewhere attention_bias covers all four.
    qkv_bias = True if model_type == "qwen2" else attention_bias
    o_bias = False if model_type == "qwen2" else attention_bias
    return ModelShape(
        name=name,
        architecture="llama",
        num_layers=_require(data, "num_hidden_layers"),
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=data.get("num_key_value_heads") or heads,
        head_dim=data.get("head_dim") or hidden // heads,
        intermediate_size=_require(data, "intermediate_size"),
        vocab_size=_require(data, "vocab_size"),
        tie_word_embeddings=bool(data.get("tie_word_embeddings", False)),
        max_position_embeddings=data.get("max_position_embeddings") or 2048,
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        mlp_bias=bool(data.get("mlp_bias", False)),
        qk_norm=model_type == "qwen3",
        model_type=model_type,
        dtype=_config_dtype(data),
        layer_windows=_windows(data),
    )


def _windows(data: Mapping[str, Any]) -> tuple[int | None, ...]:
    """Each layer's sliding window as kvserve runs it (attention/sliding_window.py), or () without any."""
    windows = tuple(layer_windows(data))
    return windows if any(w is not None for w in windows) else ()


def _gpt2_from_dict(data: Mapping[str, Any], name: str) -> ModelShape:
    hidden = _require(data, "n_embd")
    heads = _require(data, "n_head")
    return ModelShape(
        name=name,
        architecture="gpt2",
        num_layers=_require(data, "n_layer"),
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        intermediate_size=data.get("n_inner") or 4 * hidden,
        vocab_size=_require(data, "vocab_size"),
        tie_word_embeddings=bool(data.get("tie_word_embeddings", True)),
        max_position_embeddings=_require(data, "n_positions"),
        qkv_bias=True,
        o_bias=True,
        mlp_bias=True,
        model_type="gpt2",
        dtype=_config_dtype(data),
    )
