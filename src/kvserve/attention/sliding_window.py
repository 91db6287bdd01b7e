"""Sliding-window attention: which layers of a model see only their last W keys.

A layer with window W lets the query at position i attend to the keys at positions j with
i - W < j <= i: W keys, its own included. That is transformers' rule
(`masking_utils.sliding_window_overlay`: kv_idx > q_idx - sliding_window; its sliding cache
keeps W - 1 past keys), which the equality tests hold kvserve to.

Where a model's config names the window:
- Mistral: `sliding_window`, for every layer (transformers' Mistral applies it to all layers even
  when a config lists `layer_types`);
- Qwen2 / Qwen3: `use_sliding_window` with `max_window_layers`, which transformers turns into
  per-layer `layer_types` entries ("sliding_attention" for layers from `max_window_layers` on,
  "full_attention" below), and `sliding_window` None when sliding is off;
- any other config with `layer_types`: the "sliding_attention" layers; without them, every layer.
`layer_windows` reads a transformers config object, or the raw dict of a config.json (what
`kvserve estimate` reads), where it applies the Qwen rule itself.

Each layer's `Attention` carries its window to the backend. The block manager frees a sequence's
blocks that have left the window only when every layer has one (`block_window`): a single
full-attention layer still reads every key.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def layer_windows(config: Any) -> list[int | None]:
    """Each decoder layer's attention window (None: full causal attention), from a Hugging Face config
    object or a config.json dict."""
    def get(key: str, default: Any = None) -> Any:
        return config.get(key, default) if isinstance(config, Mapping) else getattr(config, key, default)

    num_layers = get("num_hidden_layers") or get("n_layer") or 0
    window = get("sliding_window")
    if not isinstance(window, int) or window <= 0 or get("use_sliding_window", True) is False:
        return [None] * num_layers
    if get("model_type") == "mistral":
        return [window] * num_layers
    layer_types = get("layer_types")
    if layer_types is None and get("max_window_layers") is not None:  # a raw Qwen config.json
        layer_types = ["sliding_attention" if i >= get("max_window_layers") else "full_attention" for i in range(num_layers)]
    if layer_types is None:
        return [window] * num_layers
    return [window if kind == "sliding_attention" else None for kind in layer_types]


def block_window(windows: list[int | None]) -> int | None:
    """The window behind which a sequence's KV blocks may be freed: the widest layer's when every layer
    has one, else None (keep every block)."""
    if not windows or any(w is None for w in windows):
        return None
    return max(w for w in windows if w is not None)
