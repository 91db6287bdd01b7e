"""`kvserve bench throughput` and `kvserve bench latency`: smoke runs that check the report, not the speed."""

from __future__ import annotations

import argparse
import importlib.machinery
import json
import sys
import types

import pytest

from kvserve.bench import hardware_floor as hardware_floor_module
from kvserve.bench.llama_cpp_runner import LlamaCppRunner, llama_cpp_skip_reason
from kvserve.bench.peers import parse_compare
from kvserve.bench.report import command_line
from kvserve.bench.runner import StreamTiming, first_tokens_agreement
from kvserve.bench.workload import random_workload
from kvserve.entrypoints.cli import build_parser, main
from kvserve.estimate.hardware import Hardware
from kvserve.estimate.model_shape import ModelShape

FLOPS = 1e9
BANDWIDTH = 2e9
KV_BYTES = str(16 << 20)


@pytest.fixture(autouse=True)
def fixed_hardware(monkeypatch):
    """Round hardware numbers instead of measuring the machine, so floors can be checked exactly."""
    hardware = Hardware("local", "test machine", 8 << 30, BANDWIDTH, {"fp32": FLOPS, "bf16": 2 * FLOPS}, None)
    monkeypatch.setattr(hardware_floor_module, "measure_local_hardware", lambda force=False: hardware)


@pytest.fixture
def no_llama_cpp(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # find_spec() then reports it as not importable


def _run(argv: list[str], tmp_path) -> dict:
    out = tmp_path / "report.json"
    assert main([*argv, "--output", str(out)]) == 0
    return json.loads(out.read_text())


def test_throughput_against_transformers(stories_dir, tmp_path, no_llama_cpp, capsys):
    report = _run(["bench", "throughput", "--model", str(stories_dir), "--kv-cache-memory-bytes", KV_BYTES,
                   "--num-prompts", "5", "--input-len-range", "4", "40", "--output-len-range", "3", "9",
                   "--compare", "transformers,llama.cpp", "--hf-batch-size", "2"], tmp_path)

    workload = report["workload"]
    assert workload["num_prompts"] == 5
    assert 5 * 4 <= workload["num_prompt_tokens"] <= 5 * 40 and 5 * 3 <= workload["num_output_tokens"] <= 5 * 9
    assert [r["engine"] for r in report["results"]] == ["kvserve", "transformers"]
    flops = {"fp32": FLOPS, "bf16": 2 * FLOPS}[report["floor"]["dtype"]]  # dtype auto: bf16 where the CPU has it
    floor_s = 2 * ModelShape.from_model_dir(stories_dir).num_params * workload["num_total_tokens"] / flops
    assert report["floor"]["compute_s"] == pytest.approx(floor_s)
    for result in report["results"]:
        assert result["num_output_tokens"] == workload["num_output_tokens"]
        assert result["total_tokens_per_s"] == pytest.approx(workload["num_total_tokens"] / result["elapsed_s"])
        assert result["requests_per_s"] == pytest.approx(5 / result["elapsed_s"])
        assert result["fraction_of_compute_floor"] == pytest.approx(floor_s / result["elapsed_s"])
    hf = report["results"][1]
    assert hf["settings"]["hf_batch_size"] == 2 and "left padding" in hf["settings"]["batching"]
    assert hf["first_8_tokens_agreement_with_kvserve"] >= 0.5  # same weights: greedy tokens agree
    assert report["speedup_total_tokens_per_s"]["kvserve/transformers"] > 0
    assert report["skipped"][0]["engine"] == "llama.cpp"
    assert "not installed" in report["skipped"][0]["reason"]

    context = report["context"]
    assert context["date"] and context["machine"]["cpu"] and context["machine"]["torch_threads"] >= 1
    assert context["command"].startswith("kvserve bench throughput --model")
    assert "--compare transformers,llama.cpp" in context["command"]
    assert report["markdown"].count("\n") == 2 and "skipped" in report["markdown"]
    printed = capsys.readouterr().out
    assert "skipping llama.cpp: llama-cpp-python is not installed" in printed
    assert report["markdown"] in printed


def test_latency_against_transformers(stories_dir, tmp_path, no_llama_cpp):
    report = _run(["bench", "latency", "--model", str(stories_dir), "--kv-cache-memory-bytes", KV_BYTES,
                   "--input-len", "24", "--output-len", "6", "--num-iters", "2", "--compare", "transformers"], tmp_path)

    assert [r["engine"] for r in report["results"]] == ["kvserve", "transformers"]
    shape = ModelShape.from_model_dir(stories_dir)
    size = {"fp32": 4, "bf16": 2}[report["floor"]["dtype"]]  # dtype auto: bf16 where the CPU has it
    kv_bytes = 2 * shape.num_layers * shape.num_kv_heads * shape.head_dim * size
    step_floor = (size * shape.num_params + (24 + 6 / 2) * kv_bytes) / BANDWIDTH
    assert report["floor"]["decode_step_s"] == pytest.approx(step_floor)
    for result in report["results"]:
        assert len(result["ttft_s_all"]) == 2 and result["ttft_s"] > 0
        assert result["decode_tokens_per_s"] > 0
        assert result["decode_fraction_of_bandwidth_floor"] == pytest.approx(step_floor * result["decode_tokens_per_s"])
    assert report["results"][1]["first_8_tokens_agreement_with_kvserve"] >= 0.5
    assert set(report["speedup_ttft"]) == {"kvserve/transformers"}
    assert report["skipped"] == []


def test_a_quantized_model_is_measured_against_the_bytes_it_holds(stories_dir, tmp_path):
    """The bandwidth floor counts the weights as the engine holds them: int8 blocks read fewer bytes than the
    parameters in the compute dtype (a Q4_1 GGUF's 99 MB, not 271 MB of bf16, for the default model)."""
    argv = ["bench", "latency", "--model", str(stories_dir), "--kv-cache-memory-bytes", KV_BYTES,
            "--input-len", "8", "--output-len", "4", "--num-iters", "1"]
    dense = _run(argv, tmp_path)["floor"]
    quantized = _run([*argv, "--quantization", "int8"], tmp_path)["floor"]
    size = {"fp32": 4, "bf16": 2}[dense["dtype"]]
    assert dense["weight_bytes"] == size * ModelShape.from_model_dir(stories_dir).num_params
    assert quantized["weight_bytes"] < 0.8 * dense["weight_bytes"]
    kv_bytes = (quantized["decode_step_s"] * BANDWIDTH - quantized["weight_bytes"]) / (8 + 4 / 2)
    assert kv_bytes == pytest.approx(quantized["kv_bytes_per_token"])


def test_dummy_weights_compare_shapes_only(tiny_llama, tmp_path):
    report = _run(["bench", "throughput", "--model", str(tiny_llama), "--load-format", "dummy",
                   "--kv-cache-memory-bytes", KV_BYTES, "--num-prompts", "3", "--input-len", "10",
                   "--output-len", "4", "--compare", "transformers", "--dtype", "bfloat16"], tmp_path)
    kvserve, hf = report["results"]
    assert kvserve["settings"]["load_format"] == "dummy" and kvserve["settings"]["dtype"] == "bfloat16"
    assert hf["settings"]["dtype"] == "bfloat16" and "random weights" in hf["settings"]["weights"]
    assert hf["first_8_tokens_agreement_with_kvserve"] is None
    assert report["floor"]["matmul_flops_per_s"] == 2 * FLOPS


def test_workload_is_seeded_and_within_ranges():
    a = random_workload(20, (5, 9), (2, 3), vocab_size=50, seed=7)
    assert a == random_workload(20, (5, 9), (2, 3), vocab_size=50, seed=7)
    assert a != random_workload(20, (5, 9), (2, 3), vocab_size=50, seed=8)
    assert all(5 <= len(r.prompt_token_ids) <= 9 and 2 <= r.output_len <= 3 for r in a.requests)
    assert all(0 <= t < 50 for r in a.requests for t in r.prompt_token_ids)
    assert a.num_total_tokens == a.num_prompt_tokens + a.num_output_tokens
    with pytest.raises(ValueError, match="input_len"):
        random_workload(1, (9, 5), (1, 1), vocab_size=50, seed=0)


def test_compare_names_are_checked():
    assert parse_compare("transformers, llama.cpp,transformers") == ["transformers", "llama.cpp"]
    with pytest.raises(argparse.ArgumentTypeError, match="allowed values are transformers, llama.cpp"):
        parse_compare("vllm")


def test_command_line_reproduces_the_arguments():
    parser = build_parser()
    argv = ["bench", "throughput", "--dtype", "bfloat16", "--num-prompts", "8", "--input-len-range", "32", "256",
            "--compare", "transformers", "--no-enable-prefix-caching"]
    args = parser.parse_args(argv)
    command = command_line("kvserve bench throughput", args.bench_parser, args)
    assert command == ("kvserve bench throughput --dtype bfloat16 --no-enable-prefix-caching --num-prompts 8 "
                       "--input-len-range 32 256 --compare transformers")
    assert parser.parse_args(command.split()[1:]) == args


def test_llama_cpp_skip_reasons(monkeypatch, tmp_path, stories_dir):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    assert "not installed" in llama_cpp_skip_reason(None, str(stories_dir))
    fake = types.ModuleType("llama_cpp")
    fake.__spec__ = importlib.machinery.ModuleSpec("llama_cpp", None)
    monkeypatch.setitem(sys.modules, "llama_cpp", fake)
    assert "not a GGUF file, and no --gguf" in llama_cpp_skip_reason(None, str(stories_dir))
    assert "does not exist" in llama_cpp_skip_reason(str(tmp_path / "missing.gguf"), str(stories_dir))
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_bytes(b"nope")
    assert "not a GGUF file" in llama_cpp_skip_reason(str(not_gguf), str(stories_dir))
    real = tmp_path / "real.gguf"
    real.write_bytes(b"GGUF" + bytes(16))
    assert llama_cpp_skip_reason(str(real), str(stories_dir)) is None


class _FakeLlama:
    """llama-cpp-python's `Llama.generate`: greedy tokens for as long as the caller asks."""

    def generate(self, tokens, temp, repeat_penalty, reset):
        assert temp == 0.0 and reset
        token = len(tokens)
        while True:
            yield token
            token += 1


def test_llama_cpp_runner_counts_exactly_the_requested_tokens():
    runner = LlamaCppRunner(_FakeLlama(), "model.gguf", "F32 ×4", "0.0")
    workload = random_workload(3, (2, 6), (1, 5), vocab_size=10, seed=0)
    run = runner.generate(workload, progress=False)
    assert [len(t) for t in run.output_token_ids] == [r.output_len for r in workload.requests]
    assert run.output_token_ids[0][0] == len(workload.requests[0].prompt_token_ids)
    timing = runner.stream([1, 2, 3], 4)
    assert timing.token_ids == [3, 4, 5, 6] and timing.ttft_s >= 0 and timing.decode_step_s >= 0
    assert runner.settings()["gguf_tensor_types"] == "F32 ×4"


def test_stream_timing_and_agreement():
    timing = StreamTiming(start=1.0, token_times=[1.5, 2.0, 3.0], token_ids=[1, 2, 3])
    assert timing.ttft_s == 0.5 and timing.decode_step_s == 0.75
    assert first_tokens_agreement([[1, 2], [3, 4]], [[1, 2], [3, 5]]) == 0.5


@pytest.mark.slow
def test_throughput_default_gguf_model_same_weights_as_transformers(tmp_path, no_llama_cpp):
    """The default model is a Q4_1 GGUF: transformers gets the same dequantized tensors (about a minute)."""
    report = _run(["bench", "throughput", "--dtype", "float32", "--kv-cache-memory-bytes", str(64 << 20),
                   "--num-prompts", "2", "--input-len", "16", "--output-len", "4", "--compare", "transformers"],
                  tmp_path)
    hf = report["results"][1]
    assert "same GGUF tensors" in hf["settings"]["weights"]
    assert hf["first_8_tokens_agreement_with_kvserve"] == 1.0
