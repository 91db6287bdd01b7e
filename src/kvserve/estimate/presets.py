"""Exact shapes of the models the write-ups reason about, by name.

The shapes are those of the published Hugging Face configs (LLaMA paper table 2
for LLaMA-1; ``meta-llama/Llama-2-*-hf``; ``Qwen/Qwen2.5-0.5B``;
``HuggingFaceTB/SmolLM2-135M``; ``gpt2``), so parameter counts are exact.
"""

from __future__ import annotations

from dataclasses import replace

from kvserve.estimate.model_shape import ModelShape


def _llama1(name: str, layers: int, hidden: int, heads: int, intermediate: int) -> ModelShape:
    return ModelShape(
        name=name, architecture="llama", num_layers=layers, hidden_size=hidden,
        num_heads=heads, num_kv_heads=heads, head_dim=hidden // heads,
        intermediate_size=intermediate, vocab_size=32000, tie_word_embeddings=False,
        max_position_embeddings=2048, model_type="llama", dtype="float16",
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
    "qwen2.5-0.5b": ModelShape(
        name="qwen2.5-0.5b", architecture="llama", num_layers=24, hidden_size=896,
        num_heads=14, num_kv_heads=2, head_dim=64, intermediate_size=4864,
        vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=32768,
        qkv_bias=True, model_type="qwen2", dtype="bfloat16",
    ),
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


def preset_names() -> list[str]:
    return list(PRESETS)


def get_preset(name: str) -> ModelShape:
    """The preset called ``name``; a ValueError lists the allowed names otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(
            f"preset: unknown name {name!r}; allowed values are {', '.join(PRESETS)}"
        ) from None
