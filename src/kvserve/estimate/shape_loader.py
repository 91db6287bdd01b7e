"""The model an estimate is about, as the user names it: a directory, a ``.gguf`` file, a hub id already in the
local Hugging Face cache, a ``config.json`` or a preset."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from kvserve.estimate.model_shape import SUPPORTED_MODEL_TYPES, ModelShape
from kvserve.estimate.presets import get_preset


def load_model_shape(
    *, model: str | Path | None = None, config: str | Path | None = None,
    preset: str | None = None,
) -> ModelShape:
    """Resolve exactly one of a model (directory, .gguf file or cached hub id), a config.json path or a preset
    name."""
    given = [(k, v) for k, v in (("model", model), ("config", config), ("preset", preset))
             if v is not None]
    if len(given) != 1:
        raise ValueError(
            "model/config/preset: give exactly one of model (a directory, .gguf file or hub id), "
            f"config (a config.json path) or preset (a name); got {len(given)}"
        )
    if model is not None:
        return shape_of_model(str(model))
    if config is not None:
        return ModelShape.from_config_file(config)
    return get_preset(str(preset))


def shape_of_model(model: str) -> ModelShape:
    """A model directory, a .gguf file (its metadata), or a hub id whose config.json is in the local cache."""
    if os.path.isfile(model) and model.lower().endswith(".gguf"):
        return ModelShape.from_config(gguf_config(model), name=Path(model).stem)
    if os.path.isdir(model) or model.startswith((".", "/")) or model.count("/") != 1:
        return ModelShape.from_model_dir(model)
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(model, "config.json")
    if not isinstance(cached, str):
        raise ValueError(f"model: {model!r} is neither a directory nor a .gguf file, and its config.json is not in the "
                         f"local Hugging Face cache (download it with `hf download {model} config.json`)")
    return replace(ModelShape.from_config_file(cached), name=model)


def gguf_config(path: str) -> dict[str, Any]:
    """The Hugging Face config fields an estimate needs, read from a GGUF file's metadata (llama.cpp's names)."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except Exception as exc:  # not a GGUF, truncated
        raise ValueError(f"model: cannot read {path} as a GGUF file: {exc}") from None

    def field(key: str, default: Any = None) -> Any:
        found = reader.fields.get(key)
        return default if found is None else found.contents()

    arch = field("general.architecture")
    if arch not in SUPPORTED_MODEL_TYPES or arch == "gpt2":
        raise ValueError(f"model: {path} holds a {arch!r} model; estimates read GGUF files of llama, mistral, "
                         "qwen2 and qwen3 models")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    tensors = {t.name for t in reader.tensors}
    heads = field(f"{arch}.attention.head_count")
    return {
        "model_type": arch,
        "num_hidden_layers": field(f"{arch}.block_count"),
        "hidden_size": field(f"{arch}.embedding_length"),
        "intermediate_size": field(f"{arch}.feed_forward_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": field(f"{arch}.attention.head_count_kv", heads),
        "head_dim": field(f"{arch}.attention.key_length"),
        "vocab_size": field(f"{arch}.vocab_size") or (len(tokens.data) if tokens is not None else None),
        "max_position_embeddings": field(f"{arch}.context_length"),
        "tie_word_embeddings": "output.weight" not in tensors,
    }
