"""llama.cpp peers without llama.cpp: the GGUF export, the skip reasons, and llama-server's runner.

The runner is driven end to end against a stand-in `llama-server` (a Python script
that speaks the same /health and streamed /completion protocol), so CI checks the
process handling and the report without building llama.cpp. One test runs the
real binary when /tmp/llama-server/llama-server exists, and is skipped otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import stat
import sys
import textwrap
import types
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, LlamaFileType
from gguf.quants import dequantize, quantize

from kvserve.bench import gguf_export
from kvserve.bench import hardware_floor as hardware_floor_module
from kvserve.bench.gguf_export import export_gguf, exported_gguf, field_value, needs_export
from kvserve.bench.llama_cpp_runner import gguf_skip_reason, peer_gguf
from kvserve.bench.llama_server_runner import (HELD_BACK, LlamaServerRunner, completion_body,
                                               llama_server_skip_reason, read_stream_line, server_command,
                                               slot_context)
from kvserve.bench.peers import PeerUnavailable, load_peer
from kvserve.bench.runner import StreamTiming
from kvserve.bench.serve import tokenize
from kvserve.bench.workload import random_workload
from kvserve.entrypoints.cli import main
from kvserve.estimate.hardware import Hardware

F32, BF16 = GGMLQuantizationType.F32, GGMLQuantizationType.BF16
REAL_SERVER = Path("/tmp/llama-server/llama-server")

METADATA = {
    "llama.block_count": (1, GGUFValueType.UINT32, None),
    "llama.rope.freq_base": (10000.0, GGUFValueType.FLOAT32, None),
    "tokenizer.ggml.add_bos_token": (False, GGUFValueType.BOOL, None),
    "tokenizer.ggml.pre": ("smollm", GGUFValueType.STRING, None),
    "tokenizer.ggml.tokens": (["<s>", "a", "Ġb", "é"], GGUFValueType.ARRAY, GGUFValueType.STRING),
    "tokenizer.ggml.token_type": ([3, 1, 1, 1], GGUFValueType.ARRAY, GGUFValueType.INT32),
    "tokenizer.ggml.scores": ([0.0, -1.5, -2.25, -3.0], GGUFValueType.ARRAY, GGUFValueType.FLOAT32),
    "general.file_type": (int(LlamaFileType.MOSTLY_Q4_1), GGUFValueType.UINT32, None),
}


def _values(shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def write_tiny_gguf(path: Path) -> Path:
    """A small llama GGUF: Q4_1, Q8_0 and F16 matrices, an F32 norm, and metadata of every kind."""
    writer = GGUFWriter(path, arch="llama")
    for key, (value, vtype, sub_type) in METADATA.items():
        writer.add_key_value(key, value, vtype, sub_type)
    for name, qtype, shape in (("token_embd.weight", GGMLQuantizationType.Q8_0, (8, 64)),
                               ("blk.0.attn_q.weight", GGMLQuantizationType.Q4_1, (64, 64)),
                               ("blk.0.ffn_up.weight", GGMLQuantizationType.F16, (16, 64)),
                               ("blk.0.attn_norm.weight", F32, (64,))):
        data = quantize(_values(shape, len(name)), qtype)
        writer.add_tensor(name, data, raw_dtype=qtype if data.dtype == np.uint8 else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def tiny_gguf(tmp_path) -> Path:
    return write_tiny_gguf(tmp_path / "tiny.Q4_1.gguf")


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    """Exports go to a fresh cache (not autouse: the engine's compiled kernels live in the real one)."""
    monkeypatch.setenv("KVSERVE_CACHE_DIR", str(tmp_path / "cache"))


def _dequantized(tensor) -> np.ndarray:
    return dequantize(tensor.data, tensor.tensor_type).reshape(-1)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_export_round_trip(tiny_gguf, tmp_path, dtype):
    out = export_gguf(str(tiny_gguf), str(tmp_path / "out" / f"tiny.{dtype}.gguf"), dtype)
    source, exported = GGUFReader(tiny_gguf), GGUFReader(out)

    keys = [k for k in source.fields if not k.startswith("GGUF.")]
    assert [k for k in exported.fields if not k.startswith("GGUF.")] == keys
    for key in keys:
        if key != "general.file_type":
            assert field_value(exported.fields[key]) == field_value(source.fields[key]), key
    file_type = LlamaFileType.ALL_F32 if dtype == "float32" else LlamaFileType.MOSTLY_BF16
    assert exported.fields["general.file_type"].contents() == file_type
    assert exported.fields["tokenizer.ggml.tokens"].contents() == ["<s>", "a", "Ġb", "é"]

    matrix_type = F32 if dtype == "float32" else BF16
    for a, b in zip(source.tensors, exported.tensors, strict=True):
        assert (b.name, b.shape.tolist()) == (a.name, a.shape.tolist())
        assert b.tensor_type == (matrix_type if len(a.shape) > 1 else F32)  # norms stay F32, as in llama.cpp
        # kvserve computes with the dequantized values in its dtype: so must llama.cpp.
        expected = torch.from_numpy(_dequantized(a).copy()).to(getattr(torch, dtype)).float().numpy()
        np.testing.assert_array_equal(_dequantized(b), expected)
    assert not needs_export(out, dtype) and needs_export(str(tiny_gguf), dtype)


def test_export_rejects_other_dtypes(tiny_gguf, tmp_path):
    with pytest.raises(ValueError, match="cannot export a GGUF as int8"):
        export_gguf(str(tiny_gguf), str(tmp_path / "x.gguf"), "int8")
    assert not (tmp_path / "x.gguf").exists()


def test_export_is_cached_by_content_and_type(tiny_gguf, tmp_path, own_cache):
    path, created = exported_gguf(str(tiny_gguf), torch.float32)
    assert created and Path(path).parent == tmp_path / "cache" / "gguf"
    assert Path(path).name == f"tiny.Q4_1.{gguf_export.file_sha256(str(tiny_gguf))[:16]}.F32.gguf"
    assert exported_gguf(str(tiny_gguf), "float32") == (path, False)
    assert exported_gguf(str(tiny_gguf), "bfloat16")[0].endswith(".BF16.gguf")
    assert [p.name for p in (tmp_path / "cache" / "gguf").iterdir() if "partial" in p.name] == []


def test_peer_gguf_exports_only_when_precisions_differ(tiny_gguf, own_cache, capsys):
    assert peer_gguf("given.gguf", str(tiny_gguf), torch.float32).path == "given.gguf"
    exported = peer_gguf(None, str(tiny_gguf), torch.float32)
    assert exported.path.endswith(".F32.gguf") and "Q4_1" in exported.source and "dequantized to F32" in exported.source
    assert "llama.cpp runs the same tensors dequantized to F32" in capsys.readouterr().out
    same = peer_gguf(None, exported.path, torch.float32)  # already kvserve's precision: used as it is
    assert same.path == exported.path and same.source is None


def test_skip_reasons(tmp_path, tiny_gguf, own_cache):
    assert "no --llama-server PATH" in llama_server_skip_reason(None)
    assert "does not exist" in llama_server_skip_reason(str(tmp_path / "missing"))
    binary = tmp_path / "llama-server"
    binary.write_text("#!/bin/sh\n")
    assert "not executable" in llama_server_skip_reason(str(binary))
    binary.chmod(binary.stat().st_mode | stat.S_IXUSR)
    assert llama_server_skip_reason(str(binary)) is None
    assert "not a GGUF file, and no --gguf" in gguf_skip_reason(None, str(tmp_path))
    assert gguf_skip_reason(None, str(tiny_gguf)) is None

    config = types.SimpleNamespace(torch_dtype=torch.float32)
    kvserve = types.SimpleNamespace(engine=types.SimpleNamespace(model_path=str(tiny_gguf), config=config))
    args = argparse.Namespace(llama_server=str(tmp_path / "missing"), gguf=None, llama_server_slots=4)
    with pytest.raises(PeerUnavailable, match="does not exist"):
        load_peer("llama-server", kvserve, args, 64)


def test_server_command_line():
    assert slot_context(100) == 256 and slot_context(255) == 256 and slot_context(256) == 512
    command = server_command("/bin/llama-server", "m.gguf", 8123, slots=16, context_per_slot=512, threads=2)
    assert command == ["/bin/llama-server", "-m", "m.gguf", "--host", "127.0.0.1", "--port", "8123",
                       "-np", "16", "-c", "8192", "-t", "2", "-tb", "2", "--cont-batching", "--cache-ram", "0",
                       "--no-webui"]
    with pytest.raises(ValueError, match="at least 1 slot"):
        server_command("s", "m.gguf", 1, slots=0, context_per_slot=256, threads=1)
    body = completion_body([5, 6], 7, stream=False)
    assert body["prompt"] == [5, 6] and body["n_predict"] == 7 and body["temperature"] == 0.0
    assert body["ignore_eos"] and body["return_tokens"] and not body["cache_prompt"] and not body["stream"]
    assert completion_body([5], 1, stream=True)["stream"]


def test_stream_lines():
    """llama-server's events: ``tokens`` holds only the token that completed the text, ``tokens_predicted`` all."""
    timing = StreamTiming(start=0.0)
    events = ['data: {"tokens": [4], "tokens_predicted": 1, "stop": false}', "", ": keep-alive",
              'data: {"tokens": [6], "tokens_predicted": 3, "stop": false}',  # token 2 was held back
              'data: {"tokens": [], "tokens_predicted": 5, "stop": true}']  # so were the last two
    for now, line in enumerate(events, 1):
        read_stream_line(line, timing, float(now))
    assert timing.token_ids == [4, HELD_BACK, 6, HELD_BACK, HELD_BACK]
    assert timing.token_times == [1.0, 4.0, 4.0, 5.0, 5.0]
    plain = StreamTiming(start=0.0)  # without counts, every id is in the stream
    read_stream_line('data: {"tokens": [7, 8]}', plain, 1.0)
    assert plain.token_ids == [7, 8] and plain.token_times == [1.0, 1.0]
    with pytest.raises(RuntimeError, match="context size"):
        read_stream_line('error: {"message": "exceeds context size"}', timing, 5.0)


FAKE_SERVER = '''
"""Stands in for llama-server: /health, and /completion generating len(prompt), len(prompt)+1, ...

Streamed, it holds back every third token and the last, as llama-server does with
tokens that end in an incomplete UTF-8 character: no event, and the next event
names only its own token.
"""
import json, os, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

if "--version" in sys.argv:
    print("version: 0 (fake)", file=sys.stderr)
    sys.exit(0)
with open(os.environ["FAKE_ARGV"], "w") as f:
    json.dump(sys.argv[1:], f)
port = int(sys.argv[sys.argv.index("--port") + 1])

class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
        self.wfile.write(b'{"status": "ok"}')

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        assert self.path == "/completion" and body["return_tokens"], body
        assert body["temperature"] == 0 and body["ignore_eos"] and not body["cache_prompt"], body
        start, n = len(body["prompt"]), body["n_predict"]
        self.send_response(200)
        if not body["stream"]:
            self.end_headers()
            result = {"tokens": list(range(start, start + n)), "tokens_predicted": n, "stop": True,
                      "timings": {"predicted_ms": 0.5 * n}}
            self.wfile.write(json.dumps(result).encode())
            return
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for i in range(n - 1):
            if i % 3 != 1:
                event = {"tokens": [start + i], "tokens_predicted": i + 1, "stop": False}
                self.wfile.write(b"data: " + json.dumps(event).encode() + b"\\n\\n")
                self.wfile.flush()
        final = {"tokens": [], "tokens_predicted": n, "stop": True}
        self.wfile.write(b"data: " + json.dumps(final).encode() + b"\\n\\n")

ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
'''


@pytest.fixture
def fake_server(tmp_path, monkeypatch) -> tuple[Path, Path]:
    """(an executable that behaves like llama-server, the file where it writes its arguments)."""
    script = tmp_path / "llama-server"
    script.write_text(f"#!{sys.executable}\n" + textwrap.dedent(FAKE_SERVER))
    script.chmod(0o755)
    argv = tmp_path / "argv.json"
    monkeypatch.setenv("FAKE_ARGV", str(argv))
    return script, argv


def test_runner_against_a_stand_in_server(fake_server, tiny_gguf):
    script, argv = fake_server
    runner = LlamaServerRunner.start(str(script), str(tiny_gguf), slots=3, max_seq_len=300, threads=2,
                                     startup_timeout_s=30)
    try:
        workload = random_workload(7, (2, 9), (1, 6), vocab_size=50, seed=1)
        run = runner.generate(workload, progress=False)
        assert run.output_token_ids == [list(range(len(r.prompt_token_ids), len(r.prompt_token_ids) + r.output_len))
                                        for r in workload.requests]
        timing = runner.stream([1, 2, 3], 4)  # ids 4 and 6 were held back: fetched unstreamed
        assert timing.token_ids == [3, 4, 5, 6] and len(timing.token_times) == 4
        assert timing.ttft_s >= 0 and timing.decode_step_s >= 0
        settings = runner.settings()
        assert settings["batching"] == "continuous batching over 3 slots of 512 tokens"
        assert settings["version"] == "llama-server version: 0 (fake)" and "median" in settings["last_run_ttft_s"]
        args = json.loads(argv.read_text())
        assert args[args.index("-np") + 1] == "3" and args[args.index("-c") + 1] == str(3 * 512)
    finally:
        runner.close()
    assert runner.process.poll() is not None
    runner.close()  # a second close is harmless


def test_runner_reports_a_server_that_dies(tmp_path, tiny_gguf):
    script = tmp_path / "llama-server"
    script.write_text("#!/bin/sh\n[ \"$1\" = --version ] && exit 0\necho 'error: cannot load model'\nexit 3\n")
    script.chmod(0o755)
    with pytest.raises(RuntimeError, match="(?s)exited with status 3.*cannot load model"):
        LlamaServerRunner.start(str(script), str(tiny_gguf), slots=1, max_seq_len=16, threads=1,
                                startup_timeout_s=30)


def test_throughput_reports_llama_server(fake_server, tiny_llama, tiny_gguf, tmp_path, monkeypatch, capsys):
    hardware = Hardware("local", "test machine", 8 << 30, 2e9, {"fp32": 1e9, "bf16": 2e9}, None)
    monkeypatch.setattr(hardware_floor_module, "measure_local_hardware", lambda force=False: hardware)
    script, _ = fake_server
    out = tmp_path / "report.json"
    assert main(["bench", "throughput", "--model", str(tiny_llama), "--kv-cache-memory-bytes", str(16 << 20),
                 "--num-prompts", "4", "--input-len", "8", "--output-len", "3",
                 "--compare", "llama-server", "--llama-server", str(script), "--llama-server-slots", "2",
                 "--gguf", str(tiny_gguf), "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [r["engine"] for r in report["results"]] == ["kvserve", "llama-server"]
    server = report["results"][1]
    assert server["num_output_tokens"] == 12 and "2 slots" in server["settings"]["batching"]
    assert "kvserve/llama-server" in report["speedup_total_tokens_per_s"]
    assert "kvserve ÷ llama-server" in report["markdown"]
    assert "--llama-server-slots 2" in report["context"]["command"]
    printed = capsys.readouterr().out
    assert "starting llama-server" in printed and "\nllama-server " in printed


def test_serve_tokenize_speaks_both_dialects():
    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        if "content" in body:  # llama-server
            return httpx.Response(200, json={"tokens": [7, 8, 9]})
        return httpx.Response(200, json={"tokens": []})  # what llama-server answers to {"prompt"}

    async def run(transport: httpx.MockTransport) -> list[int]:
        async with httpx.AsyncClient(transport=transport, base_url="http://x") as client:
            return await tokenize(client, "m", "some text")

    assert asyncio.run(run(httpx.MockTransport(handler))) == [7, 8, 9]
    assert asyncio.run(run(httpx.MockTransport(lambda r: httpx.Response(404)))) == []


@pytest.mark.skipif(not os.access(REAL_SERVER, os.X_OK), reason=f"{REAL_SERVER} is not built here")
def test_real_llama_server_generates_exact_lengths():
    """The real binary on the default model's own (Q4_1) file: no export, a few seconds."""
    from kvserve.models.default_model import DefaultModelNotFoundError, default_model_path

    try:
        model = default_model_path()
    except DefaultModelNotFoundError as exc:
        pytest.skip(str(exc))
    runner = LlamaServerRunner.start(str(REAL_SERVER), model, slots=2, max_seq_len=64, threads=torch.get_num_threads())
    try:
        workload = random_workload(3, (8, 16), (4, 8), vocab_size=49152, seed=0)
        run = runner.generate(workload, progress=False)
        assert [len(t) for t in run.output_token_ids] == [r.output_len for r in workload.requests]
        timing = runner.stream(workload.requests[0].prompt_token_ids, workload.requests[0].output_len)
        assert timing.token_ids == run.output_token_ids[0]  # greedy, no prompt cache: the same tokens
    finally:
        runner.close()
    assert runner.process.poll() is not None
