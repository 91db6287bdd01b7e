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

Each layer's `Attention` carries its window to the backend. The block manager frees a sequence's
blocks that have left the window only when every layer has one (`block_window`): a single
full-attention layer still reads every key.
"""

from __future__ import annotations

from typing import Any


def layer_windows(hf_config: Any) -> list[int | None]:
    """Each decoder layer's attention window (None: full causal attention), from a Hugging Face config."""
    num_layers = getattr(hf_config, "num_hidden_layers", None) or getattr(hf_config, "n_layer", None) or 0
    window = getattr(hf_config, "sliding_window", None)
    if not isinstance(window, int) or window <= 0:
        return [None] * num_layers
    layer_types = getattr(hf_config, "layer_types", None)
    if layer_types is None or getattr(hf_config, "model_type", None) == "mistral":
        return [window] * num_layers
    return [window if kind == "sliding_attention" else None for kind in layer_types]


def block_window(windows: list[int | None]) -> int | None:
    """The window behind which a sequence's KV blocks may be freed: the widest layer's when every layer
    has one, else None (keep every block)."""
    if not windows or any(w is None for w in windows):
        return None
    return max(w for w in windows if w is not None)
