"""Model directories for ``load_format="dummy"``: a config.json at a shape, a tiny tokenizer.

The engine needs a directory with a ``config.json`` and a tokenizer even when it
fills the weights with random numbers. :func:`write_dummy_model_dir` writes one
for any :class:`~kvserve.estimate.ModelShape` (a preset, or one of the small
shapes sized for CPU benchmarks in :mod:`kvserve.bench.shapes`), so ``kvserve
estimate --validate`` and ``kvserve bench ablation`` can run the engine at exactly
the shape the estimator reasons about, without downloading anything.

The tokenizer is a 512-token byte-level BPE trained on a few sentences: enough to
turn text into ids and back. Benchmarks feed token ids directly, so a model
vocabulary larger than the tokenizer's is fine.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from kvserve.estimate.model_shape import ModelShape

TOKENIZER_VOCAB_SIZE = 512
BOS_TOKEN_ID = 0  # "<s>", the first special token of the tiny tokenizer
EOS_TOKEN_ID = 1  # "</s>"

_CORPUS = (
    "Once upon a time there was a little girl who loved to play outside. "
    "The quick brown fox jumps over the lazy dog. def f(x): return x * 2\n"
    "Numbers 0123456789 and symbols !@#$%^&*() are tokens too. "
) * 20


def tiny_tokenizer() -> Any:
    """A 512-token byte-level BPE tokenizer with ``<s>`` (id 0) and ``</s>`` (id 1)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE, special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator([_CORPUS], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def hf_config_dict(shape: ModelShape) -> dict[str, Any]:
    """A Hugging Face ``config.json`` dict for ``shape`` (``ModelShape.from_config`` inverted)."""
    dtype = shape.dtype or "float32"
    common = {"vocab_size": shape.vocab_size, "bos_token_id": BOS_TOKEN_ID,
              "eos_token_id": EOS_TOKEN_ID, "tie_word_embeddings": shape.tie_word_embeddings,
              "torch_dtype": dtype}
    if shape.architecture == "gpt2":
        return {**common, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
                "n_embd": shape.hidden_size, "n_layer": shape.num_layers,
                "n_head": shape.num_heads, "n_inner": shape.intermediate_size,
                "n_positions": shape.max_position_embeddings}
    model_type = shape.model_type or "llama"
    architecture = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                    "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[model_type]
    config = {**common, "model_type": model_type, "architectures": [architecture],
              "hidden_size": shape.hidden_size, "intermediate_size": shape.intermediate_size,
              "num_hidden_layers": shape.num_layers, "num_attention_heads": shape.num_heads,
              "num_key_value_heads": shape.num_kv_heads, "head_dim": shape.head_dim,
              "max_position_embeddings": shape.max_position_embeddings,
              "mlp_bias": shape.mlp_bias, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
              "hidden_act": "silu"}
    if model_type != "qwen2":
        if shape.qkv_bias != shape.o_bias:
            raise ValueError(f"shape: {model_type} has one attention_bias flag for q, k, v and o; "
                             f"got qkv_bias={shape.qkv_bias}, o_bias={shape.o_bias}")
        config["attention_bias"] = shape.qkv_bias
    return config


def write_dummy_model_dir(shape: ModelShape, directory: str | Path,
                          max_position_embeddings: int | None = None) -> Path:
    """Write ``config.json`` (from ``shape``) and the tiny tokenizer into ``directory``.

    Load it with ``EngineConfig(model=directory, load_format="dummy")``.
    ``max_position_embeddings`` overrides the shape's context length.
    """
    from transformers import AutoConfig

    if max_position_embeddings is not None:
        shape = replace(shape, max_position_embeddings=max_position_embeddings)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    data = hf_config_dict(shape)
    model_type = data.pop("model_type")
    AutoConfig.for_model(model_type, **data).save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory
