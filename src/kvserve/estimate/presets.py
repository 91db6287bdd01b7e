"""Exact shapes of the models people ask about, by the names they write.

Each shape is copied from the model's published Hugging Face ``config.json``
(LLaMA paper, table 2, for LLaMA-1), so its parameter count is exact:
``PUBLISHED_PARAMS`` holds each model's own count, the total of its
safetensors checkpoint as the Hub's model page shows it, and the tests check every
preset against it.

- ``meta-llama/Llama-2-7b-hf``, ``meta-llama/Llama-2-70b-hf``
- ``meta-llama/Meta-Llama-3-8B`` and ``meta-llama/Llama-3.1-8B`` (the same shapes; 3.1's
  context is 131,072 tokens), ``meta-llama/Meta-Llama-3-70B``, ``meta-llama/Llama-3.1-70B``
- ``mistralai/Mistral-7B-v0.3`` (``mistral-7b``: 32,768-token vocabulary, no sliding
  window) and ``mistralai/Mistral-7B-v0.1`` (32,000 tokens, a 4,096-token window on every layer)
- ``Qwen/Qwen2.5-0.5B``, ``Qwen/Qwen2.5-7B``, ``Qwen/Qwen2.5-72B`` (q/k/v biases)
- ``HuggingFaceTB/SmolLM2-135M``, ``openai-community/gpt2``

Names are matched the way people write them: case, ``-``, ``_``, ``.`` and spaces do not
matter beyond separating digits (``llama-2-7b`` is ``llama2-7b``, ``Llama-3.1-8B`` is
``llama-3.1-8b``), a hub organization (``meta-llama/``) and the suffixes ``-hf``,
``-instruct`` and ``-chat`` (the same shapes) are dropped.
"""

from __future__ import annotations

import re
from dataclasses import replace

from kvserve.estimate.model_shape import ModelShape


def _llama1(name: str, layers: int, hidden: int, heads: int, intermediate: int) -> ModelShape:
    return ModelShape(
        name=name, architecture="llama", num_layers=layers, hidden_size=hidden,
        num_heads=heads, num_kv_heads=heads, head_dim=hidden // heads,
        intermediate_size=intermediate, vocab_size=32000, tie_word_embeddings=False,
        max_position_embeddings=2048, model_type="llama", dtype="float16",
    )


def _llama3(name: str, layers: int, hidden: int, heads: int, intermediate: int, context: int) -> ModelShape:
    return ModelShape(
        name=name, architecture="llama", num_layers=layers, hidden_size=hidden,
        num_heads=heads, num_kv_heads=8, head_dim=128, intermediate_size=intermediate,
        vocab_size=128256, tie_word_embeddings=False, max_position_embeddings=context,
        model_type="llama", dtype="bfloat16",
    )


def _mistral(name: str, vocab: int, window: int | None) -> ModelShape:
    return ModelShape(
        name=name, architecture="llama", num_layers=32, hidden_size=4096, num_heads=32,
        num_kv_heads=8, head_dim=128, intermediate_size=14336, vocab_size=vocab,
        tie_word_embeddings=False, max_position_embeddings=32768, model_type="mistral",
        dtype="bfloat16", layer_windows=() if window is None else (window,) * 32,
    )


def _qwen25(name: str, layers: int, hidden: int, heads: int, kv_heads: int, intermediate: int,
            vocab: int, tied: bool, context: int) -> ModelShape:
    return ModelShape(
        name=name, architecture="llama", num_layers=layers, hidden_size=hidden,
        num_heads=heads, num_kv_heads=kv_heads, head_dim=hidden // heads,
        intermediate_size=intermediate, vocab_size=vocab, tie_word_embeddings=tied,
        max_position_embeddings=context, qkv_bias=True, model_type="qwen2", dtype="bfloat16",
    )


_LLAMA_7B = _llama1("llama-7b", 32, 4096, 32, 11008)
_LLAMA2_7B = replace(_LLAMA_7B, name="llama2-7b", max_position_embeddings=4096)

PRESETS: dict[str, ModelShape] = {
    "llama-7b": _LLAMA_7B,
    "llama-13b": _llama1("llama-13b", 40, 5120, 40, 13824),
    "llama-33b": _llama1("llama-33b", 60, 6656, 52, 17920),
    "llama-65b": _llama1("llama-65b", 80, 8192, 64, 22016),
    "llama2-7b": _LLAMA2_7B,
    # Not a released model: llama2-7b with the 8 key/value heads (GQA, 4 query heads
    # per kv head) that llama2-70b uses. Hidden size, query heads and MLP are
    # unchanged, so only the k/v projections (and the KV cache) shrink 4x.
    "llama2-7b-gqa": _LLAMA2_7B.with_kv_heads(8, name="llama2-7b-gqa"),
    "llama2-70b": replace(
        _llama1("llama2-70b", 80, 8192, 64, 28672),
        num_kv_heads=8, max_position_embeddings=4096,
    ),
    "llama-3-8b": _llama3("llama-3-8b", 32, 4096, 32, 14336, 8192),
    "llama-3.1-8b": _llama3("llama-3.1-8b", 32, 4096, 32, 14336, 131072),
    "llama-3-70b": _llama3("llama-3-70b", 80, 8192, 64, 28672, 8192),
    "llama-3.1-70b": _llama3("llama-3.1-70b", 80, 8192, 64, 28672, 131072),
    "mistral-7b": _mistral("mistral-7b", 32768, None),
    "mistral-7b-v0.1": _mistral("mistral-7b-v0.1", 32000, 4096),
    "qwen2.5-0.5b": _qwen25("qwen2.5-0.5b", 24, 896, 14, 2, 4864, 151936, True, 32768),
    "qwen2.5-7b": _qwen25("qwen2.5-7b", 28, 3584, 28, 4, 18944, 152064, False, 131072),
    "qwen2.5-72b": _qwen25("qwen2.5-72b", 80, 8192, 64, 8, 29568, 152064, False, 131072),
    "smollm2-135m": ModelShape(
        name="smollm2-135m", architecture="llama", num_layers=30, hidden_size=576,
        num_heads=9, num_kv_heads=3, head_dim=64, intermediate_size=1536,
        vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=8192,
        model_type="llama", dtype="bfloat16",
    ),
    "gpt2": ModelShape(
        name="gpt2", architecture="gpt2", num_layers=12, hidden_size=768,
        num_heads=12, num_kv_heads=12, head_dim=64, intermediate_size=3072,
        vocab_size=50257, tie_word_embeddings=True, max_position_embeddings=1024,
        qkv_bias=True, o_bias=True, mlp_bias=True, model_type="gpt2", dtype="float32",
    ),
}

# Each released model's own parameter count: the total of its safetensors checkpoint on the Hugging Face
# Hub (the model page's "Model size"), and for LLaMA-1 the paper's table 2 (6.7B, 13.0B, 32.5B, 65.2B;
# its weights were not published as safetensors). llama2-7b-gqa is not a released model.
PUBLISHED_PARAMS: dict[str, float] = {
    "llama-7b": 6.7e9,
    "llama-13b": 13.0e9,
    "llama-33b": 32.5e9,
    "llama-65b": 65.2e9,
    "llama2-7b": 6_738_415_616,
    "llama2-70b": 68_976_648_192,
    "llama-3-8b": 8_030_261_248,
    "llama-3.1-8b": 8_030_261_248,
    "llama-3-70b": 70_553_706_496,
    "llama-3.1-70b": 70_553_706_496,
    "mistral-7b": 7_248_023_552,
    "mistral-7b-v0.1": 7_241_732_096,
    "qwen2.5-0.5b": 494_032_768,
    "qwen2.5-7b": 7_615_616_512,
    "qwen2.5-72b": 72_706_203_648,
    "smollm2-135m": 134_515_008,
    "gpt2": 124_439_808,
}


def canonical_name(name: str) -> str:
    """``name`` as it is matched: lower case, without a hub organization, ``meta-`` or the suffixes that keep
    the shapes; separators between two digits become one ``.`` (``3.1`` is not ``31``, and ``2-7b`` is
    ``2.7b``), the others go: ``Llama-2-7b-hf`` and ``llama2-7b`` are both ``llama2.7b``."""
    key = name.strip().lower().rpartition("/")[2]
    key = re.sub(r"^meta-", "", key)
    key = re.sub(r"([-_.\s](hf|instruct|chat|base))+$", "", key)
    key = re.sub(r"(?<=\d)[-_.\s]+(?=\d)", ".", key)
    return re.sub(r"[-_\s]|\.(?!\d)|(?<!\d)\.", "", key)


_BY_CANONICAL = {canonical_name(name): name for name in PRESETS}


def preset_names() -> list[str]:
    return list(PRESETS)


def get_preset(name: str) -> ModelShape:
    """The preset called ``name`` (written any way ``canonical_name`` matches); a ValueError lists the allowed
    names otherwise."""
    found = _BY_CANONICAL.get(canonical_name(name))
    if found is None:
        raise ValueError(
            f"preset: unknown name {name!r}; allowed values are {', '.join(PRESETS)} "
            "(written with or without dashes, e.g. llama-2-7b)"
        )
    return PRESETS[found]
