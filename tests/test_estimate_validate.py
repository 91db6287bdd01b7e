"""``kvserve estimate --validate``: the predicted KV cache equals what the engine allocates.

Also the pieces it stands on: the dummy model directory written from a shape,
and the estimator's block rounding, which must follow the engine's integer rule.
"""

from __future__ import annotations

import json

import pytest
import torch

from kvserve.bench.shapes import BENCH_SHAPES
from kvserve.estimate.dummy_model import hf_config_dict, write_dummy_model_dir
from kvserve.estimate import EstimateParams, ModelShape, estimate, get_preset
from kvserve.estimate.cli import main
from kvserve.estimate.hardware import HARDWARE
from kvserve.estimate.roofline import kv_cache_tokens
from kvserve.estimate.validate import parse_batches

TINY = BENCH_SHAPES["bench-tiny"]  # 2 layers, 2 kv heads x 16, fp32: 512 B per token


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run faster on one thread, above all on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_dummy_model_dir(TINY, tmp_path_factory.mktemp("bench-tiny"))


@pytest.mark.parametrize("name", ["llama-13b", "llama2-7b-gqa", "qwen2.5-0.5b", "smollm2-135m",
                                  "gpt2", "bench-small"])
def test_dummy_config_round_trips_to_the_same_shape(name: str) -> None:
    shape = BENCH_SHAPES.get(name) or get_preset(name)
    assert ModelShape.from_config(hf_config_dict(shape), name=shape.name) == shape


def test_dummy_model_dir_loads_in_the_engine_with_the_exact_parameter_count(tiny_dir) -> None:
    from kvserve.config import EngineConfig
    from kvserve.engine.llm_engine import LLMEngine

    engine = LLMEngine(EngineConfig(model=str(tiny_dir), load_format="dummy", dtype="float32",
                                    kv_cache_memory_bytes=2**20))
    assert engine.worker_info.num_parameters == TINY.num_params
    assert engine.tokenizer.decode(engine.tokenizer("Once upon a time").input_ids) == \
        "Once upon a time"


@pytest.mark.parametrize(("budget", "block_size"), [
    (1_000_000, 16), (3 * 8192, 16), (3 * 8192 - 1, 16), (123_457, 8), (2**20 + 5, 32),
])
def test_estimator_sizes_the_kv_cache_like_the_engine(tiny_dir, budget: int,
                                                      block_size: int) -> None:
    from kvserve.config import EngineConfig
    from kvserve.engine.llm_engine import LLMEngine

    engine = LLMEngine(EngineConfig(model=str(tiny_dir), load_format="dummy", dtype="float32",
                                    kv_cache_memory_bytes=budget, block_size=block_size))
    predicted = estimate(TINY, HARDWARE["a100-40gb"], EstimateParams(
        dtype="fp32", kv_cache_memory_bytes=budget, block_size=block_size))
    stats = engine.stats()
    assert predicted.kv_cache_tokens == stats.num_blocks * stats.block_size
    assert predicted.kv_cache_tokens == budget // (512 * block_size) * block_size
    assert predicted.kv_cache_bytes == engine.worker_info.kv_cache_bytes


@pytest.mark.parametrize(("kv_dtype", "kv_cache_dtype"), [("int8", "int8"), ("fp8", "fp8_e4m3")])
def test_estimator_sizes_a_quantized_kv_cache_like_the_engine(tiny_dir, kv_dtype: str, kv_cache_dtype: str) -> None:
    """--kv-dtype int8 / fp8 counts the engine's scales: 2 x 2 layers x 2 kv heads x (16 + 4) = 160 B per token."""
    from kvserve.config import EngineConfig
    from kvserve.engine.llm_engine import LLMEngine

    budget = 1_000_000
    engine = LLMEngine(EngineConfig(model=str(tiny_dir), load_format="dummy", dtype="float32",
                                    kv_cache_memory_bytes=budget, kv_cache_dtype=kv_cache_dtype))
    predicted = estimate(TINY, HARDWARE["a100-40gb"], EstimateParams(
        dtype="fp32", kv_dtype=kv_dtype, kv_cache_memory_bytes=budget))
    stats = engine.stats()
    assert predicted.kv_bytes_per_token == 160
    assert predicted.kv_cache_tokens == stats.num_blocks * stats.block_size == budget // (160 * 16) * 16
    assert predicted.kv_cache_bytes == engine.worker_info.kv_cache_bytes


def test_kv_cache_tokens_is_exact_for_large_integer_budgets() -> None:
    per_block = 3 * 16
    budget = 2**60 * per_block - 1  # float division would round up to 2**60 blocks
    assert kv_cache_tokens(budget, 3, 16) == (2**60 - 1) * 16


def test_validate_prints_predicted_vs_measured_json(tiny_dir, capsys) -> None:
    config = tiny_dir / "config.json"
    code = main(["--validate", "--config", str(config), "--input-len", "64", "--dtype", "fp32",
                 "--validate-batches", "1,4", "--validate-context", "16",
                 "--kv-cache-memory-bytes", "1000000", "--json"])
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    kv = data["kv_cache"]
    # 1,000,000 B // (512 B per token x 16) = 122 blocks = 1,952 tokens = 999,424 B.
    assert kv["predicted_tokens"] == kv["measured_tokens"] == 1952
    assert kv["predicted_bytes"] == kv["measured_bytes"] == 999_424
    assert kv["match"] is True
    assert data["parameters"]["predicted"] == data["parameters"]["measured"] == TINY.num_params
    assert [d["batch"] for d in data["decode"]] == [1, 4]
    for step in [data["prefill"], *data["decode"]]:
        assert step["floor"]["seconds"] > 0 and step["measured_s"] > 0
        assert step["ratio"] == pytest.approx(step["measured_s"] / step["floor"]["seconds"])
    assert data["meta"]["command"].startswith("kvserve estimate --config")
    assert "--validate" in data["meta"]["command"]


def test_validate_runs_the_engine_with_the_kv_dtype_asked_for(tiny_dir, capsys) -> None:
    code = main(["--validate", "--config", str(tiny_dir / "config.json"), "--input-len", "16", "--dtype", "fp32",
                 "--kv-dtype", "int8", "--validate-batches", "2", "--validate-context", "8",
                 "--kv-cache-memory-bytes", "1000000", "--json"])
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    assert data["engine"]["dtype"] == "float32" and data["engine"]["kv_cache_dtype"] == "int8"
    # 1,000,000 B // (160 B per token x 16) = 390 blocks = 6,240 tokens = 998,400 B.
    kv = data["kv_cache"]
    assert kv["predicted_tokens"] == kv["measured_tokens"] == 6240
    assert kv["predicted_bytes"] == kv["measured_bytes"] == 998_400


def test_validate_table_on_a_real_checkpoint(stories_dir, capsys) -> None:
    code = main(["--validate", "--model", str(stories_dir), "--input-len", "32",
                 "--validate-batches", "1,2", "--validate-context", "8"])
    assert code == 0
    out = capsys.readouterr().out
    assert "auto weights" in out
    for label in ("KV cache bytes", "KV cache tokens", "prefill 1 × 32", "decode batch 1",
                  "decode batch 2", "measured/floor", "machine"):
        assert label in out, label
    kv_rows = [line for line in out.splitlines() if line.strip().startswith("KV cache")]
    assert len(kv_rows) == 2 and all(row.rstrip().endswith("equal") for row in kv_rows)


@pytest.mark.parametrize(("argv", "message"), [
    (["--hardware", "a100-40gb"], "--validate measures this machine"),
    (["--validate-batches", "0,8"], "validate_batches: got '0,8'"),
    (["--preset", "gpt2", "--load-format", "auto"], "load_format: got 'auto'"),
    (["--preset", "gpt2", "--kv-dtype", "fp16"], "the engine keeps weights and KV cache"),
])
def test_validate_rejects_bad_input(argv: list[str], message: str, capsys) -> None:
    assert main(["--validate", *argv]) == 2
    assert message in capsys.readouterr().err


def test_estimate_without_a_model_still_asks_for_one(capsys) -> None:
    assert main(["--hardware", "l4"]) == 2
    assert "give one of --model DIR, --config PATH or --preset NAME" in capsys.readouterr().err


def test_parse_batches() -> None:
    assert parse_batches(None) == (1, 8, 64)
    assert parse_batches("2,16") == (2, 16)


def test_kv_budget_replaces_memory_minus_weights() -> None:
    params = EstimateParams(dtype="fp16", kv_cache_memory_bytes=40e9)
    result = estimate(get_preset("llama-13b"), HARDWARE["a100-40gb"], params)
    assert result.kv_cache_budget_bytes == 40e9
    assert result.kv_cache_tokens == 40_000_000_000 // (819_200 * 16) * 16


def test_validate_grows_a_tensor_parallel_section(tiny_dir, capsys) -> None:
    """--num-devices 2: each rank holds half the KV heads in the same per-rank budget (twice the tokens), about
    half the weights, and its all-reduce time per decode step is set against the estimator's term."""
    config = tiny_dir / "config.json"
    code = main(["--validate", "--config", str(config), "--input-len", "32", "--dtype", "fp32", "--num-devices", "2",
                 "--validate-batches", "1,4", "--validate-context", "16", "--kv-cache-memory-bytes", "1000000", "--json"])
    assert code == 0
    tp = json.loads(capsys.readouterr().out)["tensor_parallel"]
    assert tp["ranks"] == 2
    # 1,000,000 B // (256 B per token per rank x 16) = 244 blocks of 4,096 B
    assert tp["measured_kv_bytes_per_rank"] == [tp["predicted_kv_bytes_per_rank"]] * 2 == [244 * 4096] * 2
    norms = 2 * 2 * 64 + 64  # RMSNorm weights, on every rank
    assert tp["measured_params_per_rank"] == [TINY.num_params // 2 + norms // 2] * 2
    assert [batch for batch, _, _ in tp["comm"]] == [1, 4]
    assert all(predicted > 0 and measured > 0 for _, predicted, measured in tp["comm"])
