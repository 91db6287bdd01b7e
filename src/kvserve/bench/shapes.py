"""Model shapes for the benchmarks, by name: small llama-style ones sized for a CPU, or any estimator preset.

``kvserve bench ablation --shape NAME`` runs the engine at one of them, with dummy
weights in a directory from :func:`kvserve.estimate.dummy_model.write_dummy_model_dir`.
"""

from __future__ import annotations

from kvserve.estimate.model_shape import ModelShape
from kvserve.estimate.presets import PRESETS


def _llama_shape(name: str, layers: int, hidden: int, heads: int, kv_heads: int,
                 intermediate: int, vocab: int, max_positions: int) -> ModelShape:
    return ModelShape(
        name=name, architecture="llama", num_layers=layers, hidden_size=hidden, num_heads=heads,
        num_kv_heads=kv_heads, head_dim=hidden // heads, intermediate_size=intermediate,
        vocab_size=vocab, tie_word_embeddings=True, max_position_embeddings=max_positions,
        model_type="llama", dtype="float32",
    )


# Llama-style shapes small enough for a 2-core CPU. ``bench-small`` (about 8 M
# parameters) is large enough that a forward over a long sequence costs clearly
# more than the engine's per-step overhead; ``bench-tiny`` is for smoke runs.
BENCH_SHAPES: dict[str, ModelShape] = {
    s.name: s for s in (
        _llama_shape("bench-small", layers=6, hidden=384, heads=6, kv_heads=2,
                     intermediate=1024, vocab=2048, max_positions=8192),
        _llama_shape("bench-tiny", layers=2, hidden=64, heads=4, kv_heads=2,
                     intermediate=128, vocab=512, max_positions=4096),
    )
}


def bench_shape(name: str) -> ModelShape:
    """A :data:`BENCH_SHAPES` entry or an estimator preset, by name."""
    if name in BENCH_SHAPES:
        return BENCH_SHAPES[name]
    if name in PRESETS:
        return PRESETS[name]
    raise ValueError(f"shape: unknown name {name!r}; allowed values are "
                     f"{', '.join([*BENCH_SHAPES, *PRESETS])}")
