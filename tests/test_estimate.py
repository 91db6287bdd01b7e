"""Tests for kvserve.estimate: formulas against hand-computed values, and the
write-ups' worked examples reproduced under the conventions stated in each test.

Only ``test_local_hardware_is_measured_once_and_cached`` measures this machine.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from pathlib import Path

import pytest

from kvserve.estimate import (
    HARDWARE, EstimateParams, ModelShape, estimate, get_hardware, get_preset, load_model_shape,
    measure_local_hardware,
)
from kvserve.estimate import hardware as hardware_module
from kvserve.estimate.arguments import parse_bytes
from kvserve.estimate.cli import main
from kvserve.estimate.roofline import (
    Deployment, allreduce_seconds, crossover_batch, decode_step_floor, kv_bytes_per_token,
    kv_cache_budget_bytes, kv_cache_tokens, max_concurrent_sequences, prefill_floor,
    sequence_kv_tokens, tp_comm_seconds, weight_bytes,
)

GiB = 2**30
MiB = 2**20
STORIES = Path(__file__).resolve().parents[2] / "shared" / "models" / "stories260K"


# ---------------------------------------------------------------- parameter counts

def test_llama_7b_parameter_count_from_exact_shapes() -> None:
    # Per layer: q,k,v,o 4·4096² + gate,up,down 3·4096·11008 + 2 RMSNorms 2·4096;
    # plus embedding and untied lm_head 2·32000·4096, plus the final norm 4096.
    per_layer = 4 * 4096**2 + 3 * 4096 * 11008 + 2 * 4096
    expected = 32 * per_layer + 2 * 32000 * 4096 + 4096
    shape = get_preset("llama-7b")
    assert shape.num_params == expected == 6_738_415_616
    assert shape.num_params == pytest.approx(6.74e9, rel=1e-3)
    assert shape.approx_num_params == 12 * 32 * 4096**2 + 32000 * 4096 == 6_573_522_944


@pytest.mark.parametrize(("name", "expected"), [
    ("llama-13b", 13_015_864_320), ("llama-33b", 32_528_943_616),
    ("llama-65b", 65_285_660_672), ("llama2-70b", 68_976_648_192),
    ("llama2-7b-gqa", 5_933_109_248), ("qwen2.5-0.5b", 494_032_768),
    ("smollm2-135m", 134_515_008), ("gpt2", 124_439_808),
])
def test_preset_parameter_counts(name: str, expected: int) -> None:
    # Values are sum(p.numel()) of the matching transformers models.
    assert get_preset(name).num_params == expected


def _tiny_hf_configs():
    import transformers as tf

    common = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=8, num_key_value_heads=2, vocab_size=101)
    return [
        tf.LlamaConfig(**common, attention_bias=True, mlp_bias=True),
        tf.LlamaConfig(**common, tie_word_embeddings=True, head_dim=16),
        tf.MistralConfig(**common),
        tf.Qwen2Config(**common, tie_word_embeddings=True),
        tf.Qwen3Config(**common, head_dim=16),
        tf.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=101, n_positions=32),
        tf.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=101, n_positions=32, n_inner=80),
    ]


@pytest.mark.parametrize("index", range(7))
def test_parameter_count_matches_transformers(index: int) -> None:
    import torch
    import transformers as tf

    config = _tiny_hf_configs()[index]
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config)
    expected = sum(p.numel() for p in model.parameters())
    assert ModelShape.from_config(config).num_params == expected
    assert ModelShape.from_config(config.to_dict()).num_params == expected


@pytest.mark.skipif(not STORIES.is_dir(), reason="shared stories260K checkpoint not present")
def test_model_dir_parameter_count_matches_checkpoint() -> None:
    with (STORIES / "model.safetensors").open("rb") as f:
        header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    header.pop("__metadata__", None)
    stored = sum(math.prod(tensor["shape"]) for tensor in header.values())
    shape = load_model_shape(model=STORIES)
    assert shape.num_params == stored
    assert (shape.num_kv_heads, shape.num_heads, shape.attention_kind) == (4, 8, "GQA")


# ---------------------------------------------------------------- KV cache and memory

def test_kv_bytes_per_token_mha_gqa_mqa() -> None:
    assert kv_bytes_per_token(get_preset("llama-7b"), "fp16") == 2 * 32 * 4096 * 2 == 524_288
    assert kv_bytes_per_token(get_preset("llama-13b"), "fp16") == 2 * 40 * 5120 * 2 == 819_200
    assert kv_bytes_per_token(get_preset("llama2-70b"), "fp16") == 2 * 80 * 8 * 128 * 2
    mha, gqa = get_preset("llama2-7b"), get_preset("llama2-7b-gqa")
    assert kv_bytes_per_token(mha, "bf16") == 4 * kv_bytes_per_token(gqa, "bf16")
    mqa = mha.with_kv_heads(1)
    assert mqa.attention_kind == "MQA" and gqa.attention_kind == "GQA"
    assert kv_bytes_per_token(mha, "fp16") == 32 * kv_bytes_per_token(mqa, "fp16")
    # int8 and fp8 as kvserve stores them: 1 byte per value and a 4-byte scale per token, kv head, K or V
    assert kv_bytes_per_token(mha, "fp8") == kv_bytes_per_token(mha, "fp16") // 2 + 2 * 32 * 32 * 4
    assert kv_bytes_per_token(mha, "int8") == kv_bytes_per_token(mha, "fp8") == 2 * 32 * 32 * (128 + 4)
    assert EstimateParams(kv_dtype="fp8_e4m3").resolved_dtypes(HARDWARE["a100-80gb"])[2] == "fp8"


def test_memory_budget_tokens_and_sequences() -> None:
    budget = kv_cache_budget_bytes(80e9, 1, 0.9, 14e9)
    assert budget == pytest.approx(72e9 - 14e9)
    assert kv_cache_budget_bytes(80e9, 1, 1.0, 14e9, weight_overhead=1.2) == pytest.approx(
        80e9 - 16.8e9)
    assert kv_cache_tokens(1_000_000, 100) == 10_000
    assert kv_cache_tokens(999_900, 100) == 9_999
    assert kv_cache_tokens(999_900, 100, block_size=16) == 624 * 16
    assert kv_cache_tokens(-5, 100) == 0
    assert max_concurrent_sequences(1024, 512) == 2
    assert max_concurrent_sequences(1024, 17, block_size=16) == 1024 / 32


MISTRAL_7B = {  # Mistral-7B-v0.1's config.json, in short
    "model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000, "max_position_embeddings": 32768,
    "sliding_window": 4096,
}


def test_sliding_window_bounds_what_a_sequence_holds() -> None:
    """With a window W on every layer a sequence holds min(seq_len, W + block - 1) tokens in whole blocks (the
    engine frees the blocks behind the window), so concurrency at 16k tokens is about 16k / 4k times that of
    full attention; a decode reads W keys per layer, not the whole context."""
    assert sequence_kv_tokens(100, None, 16) == 112
    assert sequence_kv_tokens(20, 24, 4) == 20
    assert sequence_kv_tokens(250, 24, 4) == 28  # keys p-23 .. p straddle at most 7 blocks of 4
    assert sequence_kv_tokens(250, 24, 1) == 24
    windowed = ModelShape.from_config(MISTRAL_7B)
    full = ModelShape.from_config({**MISTRAL_7B, "sliding_window": None})
    assert windowed.layer_windows == (4096,) * 32 and windowed.kv_window == 4096 and full.layer_windows == ()
    params = EstimateParams(dtype="bf16", input_len=8192, output_len=8192, batch=8)
    a, b = estimate(windowed, HARDWARE["a100-80gb"], params), estimate(full, HARDWARE["a100-80gb"], params)
    assert a.kv_cache_tokens == b.kv_cache_tokens and a.sequence_kv_tokens == 4112 and b.sequence_kv_tokens == 16384
    assert a.max_concurrent_sequences == a.kv_cache_tokens / 4112
    assert a.max_concurrent_sequences / b.max_concurrent_sequences == pytest.approx(16384 / 4112)
    assert a.decode_context_len == b.decode_context_len == 12288 and a.decode_attended_len == 4096
    assert a.decode.memory_s < b.decode.memory_s
    short = EstimateParams(dtype="bf16", input_len=1000, output_len=1000)  # inside the window: no difference
    assert estimate(windowed, HARDWARE["a100-80gb"], short).to_dict() | {"model": None} == \
        estimate(full, HARDWARE["a100-80gb"], short).to_dict() | {"model": None}


def test_attention_sinks_count_in_what_a_sequence_holds() -> None:
    """The engine's --sliding-window W and --attention-sinks S: a sequence holds min(seq_len, S + W) tokens
    (the sinks' blocks, and the window's as above), whatever the model's own windows, and a decode reads
    S + W keys per layer; concurrency follows."""
    assert sequence_kv_tokens(250, 24, 4, sinks=4) == 4 + 28
    assert sequence_kv_tokens(250, 24, 16, sinks=4) == 16 + 48
    assert sequence_kv_tokens(20, 24, 4, sinks=4) == 20
    shape = ModelShape.from_config({**MISTRAL_7B, "sliding_window": None})
    params = EstimateParams(dtype="bf16", input_len=8192, output_len=8192, sliding_window=1024, attention_sinks=4)
    result = estimate(shape, HARDWARE["a100-80gb"], params)
    assert result.sequence_kv_tokens == 16 + 1024 + 16 and result.decode_attended_len == 1028
    assert result.max_concurrent_sequences == result.kv_cache_tokens / 1056
    with pytest.raises(ValueError, match="attention_sinks: got 4; needs a sliding_window"):
        EstimateParams(attention_sinks=4)


def test_windows_on_some_layers_shorten_reads_but_keep_every_block() -> None:
    """Qwen2 with use_sliding_window and max_window_layers 20 of 24 layers: the 4 windowed layers read less,
    but kvserve keeps every token's K/V (the full-attention layers need them); off, there is no window."""
    qwen = {"model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
            "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936, "sliding_window": 1024,
            "use_sliding_window": True, "max_window_layers": 20}
    shape = ModelShape.from_config(qwen)
    assert shape.layer_windows == (None,) * 20 + (1024,) * 4 and shape.kv_window is None
    assert shape.attended_len(5000) == (20 * 5000 + 4 * 1024) / 24
    result = estimate(shape, HARDWARE["l4"], EstimateParams(input_len=4000, output_len=2000))
    assert result.sequence_kv_tokens == 6000
    assert ModelShape.from_config({**qwen, "use_sliding_window": False}).layer_windows == ()
    with pytest.raises(ValueError, match=r"layer_windows: got \(0,\); must be empty or one window per layer \(24\)"):
        dataclasses.replace(shape, layer_windows=(0,))


def test_tensor_parallel_replicates_kv_heads_beyond_their_count() -> None:
    shape = get_preset("llama2-70b")  # 8 kv heads
    h100 = HARDWARE["h100-80gb"]
    on_8 = estimate(shape, h100, EstimateParams(num_devices=8))
    on_16 = estimate(shape, h100, EstimateParams(num_devices=16))
    assert on_8.kv_bytes_per_token_per_device == 2 * 80 * 1 * 128 * 2
    assert on_16.kv_bytes_per_token_per_device == on_8.kv_bytes_per_token_per_device


# ---------------------------------------------------------------- roofline

def test_decode_floor_at_batch_1_is_weights_over_bandwidth() -> None:
    shape, a100 = get_preset("llama-7b"), HARDWARE["a100-80gb"]
    weights = weight_bytes(shape.num_params, "fp16")
    step = decode_step_floor(shape, Deployment(a100, 1, "fp16"), weights, 524_288, 1, 0)
    assert step.memory_s == pytest.approx(6_738_415_616 * 2 / 2.039e12)  # 6.61 ms
    assert step.compute_s == pytest.approx(2 * 6_738_415_616 / 312e12)
    assert step.bound == "memory" and step.comm_s == 0
    assert 1 / step.seconds == pytest.approx(151.3, rel=1e-3)


def test_crossover_batch_is_the_ops_per_byte_ratio_for_2_byte_weights() -> None:
    shape = get_preset("llama-7b")
    for name in ("a100-40gb", "h100-80gb", "l4"):
        hw = HARDWARE[name]
        deployment = Deployment(hw, 1, "fp16")
        ratio = hw.flops("fp16") / hw.memory_bandwidth
        fp16 = crossover_batch(shape, deployment, weight_bytes(shape.num_params, "fp16"), 0, 0)
        int8 = crossover_batch(shape, deployment, weight_bytes(shape.num_params, "int8"), 0, 0)
        assert fp16 == pytest.approx(ratio)
        assert int8 == pytest.approx(ratio / 2)
        step = decode_step_floor(shape, deployment, 2 * shape.num_params, 0, round(fp16), 0)
        assert step.memory_s == pytest.approx(step.compute_s, rel=0.01)
    assert HARDWARE["a100-40gb"].flops("fp16") / HARDWARE["a100-40gb"].memory_bandwidth \
        == pytest.approx(200.6, rel=1e-3)


def test_long_context_mha_decode_never_turns_compute_bound_but_gqa_does() -> None:
    a100 = Deployment(HARDWARE["a100-80gb"], 1, "bf16")
    mha, gqa = get_preset("llama2-7b"), get_preset("llama2-7b-gqa")
    # Per sequence: 2P/F ≈ 43 µs of compute vs 1024·512 KiB / 2.039 TB/s ≈ 263 µs of KV reads.
    assert math.isinf(crossover_batch(mha, a100, 2 * mha.num_params, 524_288, 1024))
    # GQA at 256 tokens: weights/bw over (compute − KV reads) per sequence ≈ 265.
    per_seq = (2 * gqa.num_params + 4 * 32 * 4096 * 256) / 312e12 - 256 * 131_072 / 2.039e12
    expected = 2 * gqa.num_params / 2.039e12 / per_seq
    assert crossover_batch(gqa, a100, 2 * gqa.num_params, 131_072, 256) == pytest.approx(expected)
    assert expected == pytest.approx(264.6, rel=1e-3)


def test_ring_allreduce_and_tensor_parallel_term() -> None:
    assert allreduce_seconds(1e6, 1, None) == 0
    assert allreduce_seconds(1e6, 8, 150e9) == pytest.approx(2 * 7 / 8 * 1e6 / 150e9)
    shape = get_preset("llama-65b")
    comm = tp_comm_seconds(shape, 16, 2, 8, 150e9)
    assert comm == pytest.approx(2 * 80 * (2 * 7 / 8 * 16 * 8192 * 2 / 150e9))
    with pytest.raises(ValueError, match="num_devices"):
        allreduce_seconds(1e6, 2, None)


def test_prefill_floor_counts_causal_attention_flops() -> None:
    shape, h100 = get_preset("llama-7b"), HARDWARE["h100-80gb"]
    step = prefill_floor(shape, Deployment(h100, 1, "bf16"), 2 * shape.num_params, 524_288, 2, 1000)
    attention = 2 * 32 * 4096 * 1000 * 1001  # sum over positions i of 4·layers·q_size·i
    flops = 2 * (2 * shape.num_params * 1000 + attention)
    assert step.compute_s == pytest.approx(flops / 989.4e12)
    assert step.bound == "compute"


def test_estimate_throughput_is_consistent() -> None:
    result = estimate(get_preset("llama-13b"), HARDWARE["a100-80gb"],
                      EstimateParams(batch=8, input_len=100, output_len=50))
    assert result.decode_context_len == 125
    assert result.decode_tokens_per_s == pytest.approx(8 / result.decode.seconds)
    assert result.request_latency_s == pytest.approx(
        result.prefill.seconds + 49 * result.decode.seconds)
    assert result.compute_dtype == result.weights_dtype == result.kv_dtype == "bf16"
    assert estimate(get_preset("gpt2"), HARDWARE["v100-32gb"], EstimateParams()).compute_dtype \
        == "fp16"


# ---------------------------------------------------------------- worked examples

def test_worked_example_llama_13b_on_a100_40gb() -> None:
    """~14,000 tokens of KV cache, ~28 sequences of 512 tokens.

    Conventions of that write-up: decimal units throughout; the card has "40 GB"
    (40e9 bytes), the weights take 2 bytes × 13.0e9 ≈ 26 GB, all of the rest is KV
    cache (memory fraction 1), and KV takes "~1 MB per token" (1e6 bytes; exactly
    it is 2·40·5120·2 = 0.82 MB).
    """
    params = EstimateParams(dtype="fp16", memory_fraction=1.0, device_memory_bytes=40e9,
                            kv_bytes_per_token=1e6, input_len=256, output_len=256,
                            block_size=1)
    result = estimate(get_preset("llama-13b"), HARDWARE["a100-40gb"], params)
    assert result.weight_bytes == pytest.approx(26e9, rel=0.002)
    assert result.kv_cache_tokens == pytest.approx(14_000, rel=0.01)  # 13,968
    assert result.max_concurrent_sequences == pytest.approx(28, rel=0.03)  # 27.3


def test_worked_example_llama_13b_on_a100_40gb_with_the_1_2x_rule() -> None:
    """The same numbers from true sizes: the card's 40 GiB, the exact 0.82 MB of KV
    per token, and "inference memory ≈ 1.2 · weights + KV" instead of rounding."""
    params = EstimateParams(dtype="fp16", memory_fraction=1.0, weight_overhead=1.2,
                            input_len=256, output_len=256)
    result = estimate(get_preset("llama-13b"), HARDWARE["a100-40gb"], params)
    assert result.kv_bytes_per_token == 819_200
    assert result.kv_cache_tokens == pytest.approx(14_000, rel=0.03)  # 14,288
    assert result.max_concurrent_sequences == pytest.approx(28, rel=0.01)  # 27.9


@pytest.mark.parametrize(("preset", "weights_dtype", "kv_per_token", "expected", "rel"), [
    ("llama-13b", "fp16", MiB, 115, 0.01),        # 115.9
    ("llama-13b", "int8", MiB, 121, 0.01),        # 121.9
    ("llama-65b", "fp16", None, 26.9, 0.002),     # 26.88
    ("llama-65b", "int8", None, 39, 0.002),       # 39.04
])
def test_worked_examples_8x_v100_32gb_at_2048_tokens(
        preset: str, weights_dtype: str, kv_per_token: float | None, expected: float,
        rel: float) -> None:
    """Sequences of 2048 tokens that fit on 8 × V100-32GB.

    Conventions that reproduce these numbers: binary units (each card 32 GiB,
    256 GiB in all; the table's true size); weights = exact parameter count × 2
    bytes (fp16) or × 1 byte (int8, every parameter); no memory fraction and no
    activation overhead; KV per token exact for LLaMA-65B (2·80·8192·2 = 2.5 MiB)
    but rounded up to "~1 MB" (1 MiB, exactly it is 0.78 MiB) for LLaMA-13B.
    (With LLaMA-13B's exact 0.78 MiB the same memory gives 148 and 156 sequences.)
    """
    params = EstimateParams(dtype="fp16", weights_dtype=weights_dtype, num_devices=8,
                            memory_fraction=1.0, kv_bytes_per_token=kv_per_token,
                            input_len=1024, output_len=1024)
    result = estimate(get_preset(preset), HARDWARE["v100-32gb"], params)
    assert result.device_memory_bytes == 32 * GiB
    assert result.max_concurrent_sequences == pytest.approx(expected, rel=rel)


def test_write_up_13b_v100_numbers_need_the_1_mb_rule() -> None:
    params = EstimateParams(dtype="fp16", num_devices=8, memory_fraction=1.0,
                            input_len=1024, output_len=1024)
    exact = estimate(get_preset("llama-13b"), HARDWARE["v100-32gb"], params)
    assert exact.max_concurrent_sequences == pytest.approx(148.3, rel=0.01)


# ---------------------------------------------------------------- errors

@pytest.mark.parametrize(("call", "match"), [
    (lambda: get_preset("llama-8b"),
     r"preset: unknown name 'llama-8b'; allowed values are .*llama-7b"),
    (lambda: get_hardware("tpu-v5"),
     r"hardware: unknown name 'tpu-v5'; allowed values are .*a100-40gb.*local"),
    (lambda: load_model_shape(config="/no/such/config.json"), r"config: file .* does not exist"),
    (lambda: load_model_shape(model="/no/such/dir"), r"model: directory .* has no config.json"),
    (lambda: load_model_shape(), r"exactly one of model"),
    (lambda: ModelShape.from_config({"model_type": "bert"}), r"model_type 'bert'.*allowed values"),
    (lambda: ModelShape.from_config({"model_type": "llama"}), r"missing required field"),
    (lambda: EstimateParams(memory_fraction=0), r"memory_fraction"),
    (lambda: EstimateParams(batch=0), r"batch: got 0"),
    (lambda: EstimateParams(kv_dtype="int4"), r"kv_dtype: got 'int4'; allowed values are"),
    (lambda: estimate(get_preset("gpt2"), HARDWARE["v100-32gb"], EstimateParams(dtype="bf16")),
     r"dtype: 'bf16' has no peak FLOP/s on hardware 'v100-32gb'; allowed values are fp32, fp16"),
    (lambda: parse_bytes("12 parsecs", "device_memory"), r"device_memory: got '12 parsecs'"),
])
def test_bad_input_raises_clear_value_errors(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()


def test_parse_bytes_units() -> None:
    assert parse_bytes("40GB") == 40e9
    assert parse_bytes("32GiB") == 32 * GiB
    assert parse_bytes("1MiB") == MiB
    assert parse_bytes("819200") == 819200
    assert parse_bytes("1e6") == 1e6


# ---------------------------------------------------------------- CLI

def test_cli_json_reproduces_the_8x_v100_example(capsys) -> None:
    code = main(["--preset", "llama-65b", "--hardware", "v100-32gb", "--num-devices", "8",
                 "--dtype", "fp16", "--weights-dtype", "int8", "--memory-fraction", "1",
                 "--input-len", "1024", "--output-len", "1024", "--batch", "39", "--json"])
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    assert data["max_concurrent_sequences"] == pytest.approx(39.04, rel=1e-3)
    assert data["max_num_seqs"] == 39 and data["batch_fits"]
    assert data["kv_bytes_per_token"] == 2 * 80 * 8192 * 2
    assert data["decode"]["bound"] in ("memory", "compute")
    assert data["meta"]["command"].startswith("kvserve estimate --preset llama-65b")
    assert {"date", "machine"} <= set(data["meta"])


def test_cli_table_names_every_quantity(capsys) -> None:
    assert main(["--preset", "llama2-70b", "--hardware", "h100-80gb", "--num-devices", "4",
                 "--batch", "32"]) == 0
    out = capsys.readouterr().out
    for label in ("parameters (exact)", "12·n·h² + V·h", "weights", "bytes per token",
                  "tokens held", "max concurrent sequences", "memory term", "compute term",
                  "tensor-parallel comm", "step floor", "compute-bound from batch", "Prefill",
                  "tokens/s", "GQA (64 heads, 8 kv heads × 128)", "machine"):
        assert label in out, label


def test_cli_table_shows_the_sliding_window(tmp_path, capsys) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps(MISTRAL_7B))
    assert main(["--config", str(config), "--hardware", "a100-80gb", "--input-len", "8192", "--output-len", "8192"]) == 0
    out = capsys.readouterr().out
    assert "each holding 4,112 (sliding window 4,096)" in out
    assert "mean context 12,288 tokens, 4,096 read per layer (sliding windows)" in out


def test_cli_reads_a_config_file_and_reports_bad_input(tmp_path, capsys) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps({
        "model_type": "llama", "hidden_size": 64, "intermediate_size": 172,
        "num_hidden_layers": 5, "num_attention_heads": 8, "num_key_value_heads": 4,
        "vocab_size": 512, "tie_word_embeddings": True}))
    assert main(["--config", str(config), "--hardware", "l4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["num_params"] == 260_032
    assert main(["--preset", "nope", "--hardware", "l4"]) == 2
    assert "preset: unknown name 'nope'" in capsys.readouterr().err


def test_weights_that_do_not_fit_leave_no_kv_cache(capsys) -> None:
    assert main(["--preset", "llama2-70b", "--hardware", "l4", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["kv_cache_tokens"] == 0 and not data["weights_fit"]
    assert "do not fit" in data["notes"][0]


# ---------------------------------------------------------------- local hardware

def test_local_hardware_is_measured_once_and_cached(tmp_path, monkeypatch) -> None:
    cache = tmp_path / "hardware.json"
    local = measure_local_hardware(cache_path=cache)
    assert local.name == "local" and cache.is_file()
    assert local.memory_bytes == hardware_module.total_ram_bytes() > 0
    # only positivity: how fast this shared machine happens to be is a benchmark's business, not a test's
    assert local.memory_bandwidth > 0
    assert local.flops("fp32") > 0 and local.flops("bf16") > 0
    assert local.flops("bf16") >= local.flops("fp32")  # bf16 widened to fp32 always reaches the fp32 rate

    def must_not_measure(_fingerprint):
        raise AssertionError("the cached measurement should have been reused")

    monkeypatch.setattr(hardware_module, "_measure", must_not_measure)
    assert measure_local_hardware(cache_path=cache) == local


def test_the_suite_never_writes_the_user_s_hardware_cache(tmp_path, monkeypatch) -> None:
    """Floors measured under the suite's load go to a file of the run's own (conftest sets
    KVSERVE_HARDWARE_CACHE), not to ~/.cache/kvserve/hardware.json, which benchmarks divide by."""
    assert hardware_module.default_cache_path() == Path(os.environ["KVSERVE_HARDWARE_CACHE"])
    assert not hardware_module.default_cache_path().is_relative_to(Path.home() / ".cache")
    monkeypatch.setenv("KVSERVE_HARDWARE_CACHE", str(tmp_path / "elsewhere.json"))
    assert hardware_module.default_cache_path() == tmp_path / "elsewhere.json"
    monkeypatch.delenv("KVSERVE_HARDWARE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert hardware_module.default_cache_path() == tmp_path / "kvserve" / "hardware.json"


# ---------------------------------------------------------------- the models and hardware people ask about

def test_every_preset_is_within_1_percent_of_its_published_parameter_count() -> None:
    from kvserve.estimate.presets import PRESETS, PUBLISHED_PARAMS

    assert set(PRESETS) - set(PUBLISHED_PARAMS) == {"llama2-7b-gqa"}  # the one preset that is not a released model
    for name, published in PUBLISHED_PARAMS.items():
        assert get_preset(name).num_params == pytest.approx(published, rel=0.01), name


@pytest.mark.parametrize(("written", "preset"), [
    ("llama-2-7b", "llama2-7b"), ("Llama-2-70b-hf", "llama2-70b"), ("meta-llama/Meta-Llama-3-8B-Instruct", "llama-3-8b"),
    ("llama3.1-70b", "llama-3.1-70b"), ("Llama-3.1-8B", "llama-3.1-8b"), ("Mistral-7B-Instruct", "mistral-7b"),
    ("mistral-7b-v0.1", "mistral-7b-v0.1"), ("Qwen/Qwen2.5-72B-Instruct", "qwen2.5-72b"), ("qwen-2.5-7b", "qwen2.5-7b"),
])
def test_presets_are_found_as_people_write_them(written: str, preset: str) -> None:
    assert get_preset(written).name == preset


def test_the_new_hardware_and_its_aliases() -> None:
    for name in ("h200", "b200", "l40s", "a10g", "mi300x", "xeon-8480"):
        hardware = get_hardware(name)
        assert hardware.memory_bandwidth > 0 and hardware.flops("bf16") > hardware.flops("fp32")
    assert get_hardware("NVIDIA H200").name == "h200" and get_hardware("MI300X").name == "mi300x"
    assert get_hardware("h100").name == "h100-80gb"
    assert get_hardware("xeon-8480").interconnect_bandwidth is None  # one socket: no tensor parallelism across


def test_model_reads_a_gguf_files_metadata(tmp_path) -> None:
    import gguf
    import numpy as np

    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "qwen2")
    for add, value in (("context_length", 4096), ("embedding_length", 64), ("feed_forward_length", 172),
                       ("block_count", 5), ("head_count", 8), ("head_count_kv", 4), ("vocab_size", 512)):
        getattr(writer, f"add_{add}")(value)
    writer.add_tensor("token_embd.weight", np.zeros((512, 64), dtype=np.float32))  # no output.weight: tied
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    shape = load_model_shape(model=str(path))
    config = {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 172, "num_hidden_layers": 5,
              "num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 512, "tie_word_embeddings": True,
              "max_position_embeddings": 4096}
    assert shape == ModelShape.from_config(config, name="tiny")


@pytest.mark.slow
def test_model_reads_smollm2s_gguf_like_its_preset() -> None:
    gguf_file = Path(__file__).resolve().parents[2] / "shared" / "models" / "smollm2-135m-instruct-q4_1" / \
        "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not gguf_file.is_file():
        pytest.skip(f"{gguf_file} is absent")
    shape = load_model_shape(model=str(gguf_file))
    assert dataclasses.replace(shape, name="smollm2-135m", dtype="bfloat16") == get_preset("smollm2-135m")


def test_model_reads_a_hub_id_from_the_local_cache(tmp_path, monkeypatch) -> None:
    import huggingface_hub.constants

    snapshot = tmp_path / "models--someone--tiny" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 64, "intermediate_size": 172, "num_hidden_layers": 5,
        "num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 512, "tie_word_embeddings": True}))
    (tmp_path / "models--someone--tiny" / "refs").mkdir()
    (tmp_path / "models--someone--tiny" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    shape = load_model_shape(model="someone/tiny")
    assert (shape.name, shape.num_params) == ("someone/tiny", 260_032)
    with pytest.raises(ValueError, match="'someone/absent' is neither a directory nor a .gguf file, and its "
                                         "config.json is not in the local Hugging Face cache"):
        load_model_shape(model="someone/absent")


def test_plot_writes_a_png_and_several_hardware_give_several_reports(tmp_path, capsys) -> None:
    pytest.importorskip("matplotlib")
    picture = tmp_path / "estimate.png"
    assert main(["--preset", "llama-2-7b", "--hardware", "a10g,h200", "--input-len", "128", "--output-len", "128",
                 "--json", "--plot", str(picture)]) == 0
    reports = json.loads(capsys.readouterr().out)
    assert [r["hardware"]["name"] for r in reports] == ["a10g", "h200"]
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and picture.stat().st_size > 10_000


def test_plot_axes_cover_the_context_and_batches() -> None:
    pytest.importorskip("matplotlib")
    from kvserve.bench.estimate_plot import batch_sizes, context_lengths

    assert context_lengths(131072) == [256 << i for i in range(10)]
    assert context_lengths(3000) == [256, 512, 1024, 2048, 3000]
    sizes = batch_sizes()
    assert sizes[0] == 1 and sizes[-1] == 4096 and sizes == sorted(set(sizes))
