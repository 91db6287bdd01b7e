"""The one-call C++ decoder layer gives what the module path gives, and is installed where it applies."""

from __future__ import annotations

import ctypes

import pytest
import torch

from kvserve import LLM, native
from kvserve.attention.kv_cache import KVCache
from kvserve.models import llama_cpu_layer
from kvserve.models.llama import LlamaDecoderLayer
from test_attention import make_batch
from test_kv_quant_attention import quantized, same_bytes

pytestmark = pytest.mark.skipif(llama_cpu_layer.load() is None, reason="the C++ kernels could not be built here")


def _layers(llm: LLM) -> list[LlamaDecoderLayer]:
    return [m for m in llm.llm_engine.executor.worker.model.modules() if isinstance(m, LlamaDecoderLayer)]


def _slots_and_positions(meta, query_lens, seq_lens, block_size):
    slots, positions = [], []
    for i, (q, n) in enumerate(zip(query_lens, seq_lens)):
        for pos in range(n - q, n):
            slots.append(int(meta.block_tables[i, pos // block_size]) * block_size + pos % block_size)
            positions.append(pos)
    return torch.tensor(slots), torch.tensor(positions)


@pytest.mark.parametrize("name", ["llama-gqa7-tied", "llama-mha-hd80", "qwen2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("first_layer", [True, False])
# 8 rows: the linear kernel's few-row paths (dot_rows_bf16 in bf16, 4-row blocks in fp32); 70: in bf16 its GEMM
# with the SiLU fused into it (in fp32 above 48 rows, torch)
@pytest.mark.parametrize("batch", [([1, 1, 6], [9, 40, 6]), ([1] * 40 + [30], list(range(5, 45)) + [50])],
                         ids=["8-rows", "70-rows"])
def test_fused_layer_matches_the_modules(tiny_model_dirs, name, dtype, first_layer, batch):
    llm = LLM(str(tiny_model_dirs[name]), dtype=str(dtype).removeprefix("torch."), kv_cache_memory_bytes=8 << 20)
    got, want = _fused_and_modules(llm, dtype, first_layer, batch)
    tol = dict(atol=3e-2, rtol=3e-2) if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-4)
    for g, w in zip((got[0], got[1], *got[2].tensors()), (want[0], want[1], *want[2].tensors())):
        torch.testing.assert_close(g.float(), w.float(), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_layer_with_a_sliding_window(tiny_model_dirs, dtype):
    """A layer with a 24-key window (tiny Mistral), on sequences of up to 50 keys: the one call passes the window."""
    llm = LLM(str(tiny_model_dirs["mistral-sliding"]), dtype=str(dtype).removeprefix("torch."), kv_cache_memory_bytes=8 << 20)
    assert _layers(llm)[1].self_attn.attn.sliding_window == 24
    got, want = _fused_and_modules(llm, dtype, False, ([1] * 40 + [30], list(range(5, 45)) + [50]))
    tol = dict(atol=3e-2, rtol=3e-2) if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-4)
    for g, w in zip((got[0], got[1]), (want[0], want[1])):
        torch.testing.assert_close(g.float(), w.float(), **tol)


@pytest.mark.parametrize("kv_format", ["int8", "fp8_e4m3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_layer_with_a_quantized_cache(tiny_model_dirs, kv_format, dtype):
    """The layer quantizes this step's K/V into the cache and reads it back as the modules (CpuBackend) do."""
    llm = LLM(str(tiny_model_dirs["llama-gqa7-tied"]), dtype=str(dtype).removeprefix("torch."),
              kv_cache_memory_bytes=8 << 20, kv_cache_dtype=kv_format)
    (out, residual, cache), (want_out, want_residual, want_cache) = _fused_and_modules(
        llm, dtype, False, ([1, 1, 6], [9, 40, 6]), kv_format)
    tol = dict(atol=3e-2, rtol=3e-2) if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.float(), want_out.float(), **tol)
    torch.testing.assert_close(residual.float(), want_residual.float(), **tol)
    assert same_bytes(cache, want_cache)  # the same K/V rows quantize to the same bytes


def _fused_and_modules(llm: LLM, dtype: torch.dtype, first_layer: bool, batch, kv_format: str = "auto"):
    """(output, residual, cache) of the second layer on a random step, run as one call and through the modules."""
    layer = _layers(llm)[1]
    assert layer.cpu_layer is not None
    attn = layer.self_attn
    (query_lens, seq_lens), block_size = batch, 4
    drop = sum(query_lens) - layer.cpu_layer.max_rows  # fp32 takes at most 48 rows in one call, bf16 256
    if drop > 0:
        assert dtype == torch.float32
        query_lens, seq_lens = query_lens[drop:], seq_lens[drop:]
    _, k_cache, v_cache, meta = make_batch(query_lens, seq_lens, attn.num_heads, attn.num_kv_heads, attn.head_dim,
                                           block_size, dtype, seed=3)
    cache = KVCache(k_cache, v_cache)
    if kv_format != "auto":
        (k_values, k_scale), (v_values, v_scale) = quantized(k_cache, kv_format), quantized(v_cache, kv_format)
        cache = KVCache(k_values, v_values, k_scale, v_scale)
    meta.slot_mapping, positions = _slots_and_positions(meta, query_lens, seq_lens, block_size)
    tokens, hidden = sum(query_lens), attn.o_proj.out_features
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(tokens, hidden, generator=gen).to(dtype)
    residual = None if first_layer else torch.randn(tokens, hidden, generator=gen).to(dtype)

    def run(fused: bool):
        cpu_layer = layer.cpu_layer
        if not fused:
            layer.cpu_layer = None
        try:
            caches = KVCache(*(t.clone() for t in cache.tensors()))
            res = None if residual is None else residual.clone()
            out, new_residual = layer(positions, x.clone(), res, caches, meta)
        finally:
            layer.cpu_layer = cpu_layer
        return out, new_residual, caches

    return run(fused=True), run(fused=False)


def test_installed_on_llama_family_and_not_where_a_piece_is_missing(tiny_model_dirs):
    fused = LLM(str(tiny_model_dirs["mistral"]), dtype="float32", kv_cache_memory_bytes=8 << 20)
    assert all(layer.cpu_layer is not None for layer in _layers(fused))
    qk_norm = LLM(str(tiny_model_dirs["qwen3"]), dtype="float32", kv_cache_memory_bytes=8 << 20)
    assert all(layer.cpu_layer is None for layer in _layers(qk_norm))  # q/k RMSNorm is not in the C++ layer
    torch_linears = LLM(str(tiny_model_dirs["mistral"]), dtype="float32", kv_cache_memory_bytes=8 << 20, linear_backend="torch")
    assert all(layer.cpu_layer is None for layer in _layers(torch_linears))
    reference = LLM(str(tiny_model_dirs["mistral"]), dtype="float32", kv_cache_memory_bytes=8 << 20, attention_backend="reference")
    assert all(layer.cpu_layer is None for layer in _layers(reference))


def test_a_model_s_layers_share_the_step_fields(tiny_model_dirs):
    """The step's pointers (positions, slots, block tables, ...) live in one StepArgs that all of a model's layers
    read, set by the first layer called with a step's tensors and again for every new step."""
    llm = LLM(str(tiny_model_dirs["llama-gqa7-tied"]), dtype="float32", kv_cache_memory_bytes=8 << 20)
    cpu_layers = [layer.cpu_layer for layer in _layers(llm)]
    assert cpu_layers and all(c is not None and c.step is cpu_layers[0].step for c in cpu_layers)
    shared = llama_cpu_layer.SharedStep()
    steps = []
    for seq_lens in ([9, 40, 6], [10, 41, 7]):
        *_, meta = make_batch([1, 1, 1], seq_lens, 4, 2, 64, 16, torch.float32)
        positions = torch.tensor([s - 1 for s in seq_lens])
        args = shared.of(positions, meta)
        assert shared.of(positions, meta) is args  # the other layers of the step
        steps.append(tuple(ptr or 0 for ptr in (args.positions, args.slot_mapping, args.block_tables, args.seq_lens,
                                                args.query_start_loc)))  # (ctypes reads a null pointer as None)
        assert steps[-1] == (positions.data_ptr(), meta.slot_mapping.data_ptr(), meta.block_tables.data_ptr(),
                             meta.seq_lens.data_ptr(), meta.query_start_loc.data_ptr())
        assert (args.num_seqs, args.tokens, args.max_blocks) == (3, 3, meta.block_tables.shape[1])
    assert steps[0] != steps[1]


def test_layer_args_mirror_the_cpp_struct():
    """The ctypes LayerArgs and StepArgs agree with llama_layer.cpp's structs, and the check sees a field removed,
    two swapped or one of another size (`load()` refuses such a library: every layer then runs through the modules)."""
    lib = native.build("llama_layer.cpp")
    assert llama_cpu_layer.layout_differences(lib) == []
    assert llama_cpu_layer.layout_differences(lib, llama_cpu_layer.StepArgs, "llama_step_args_layout") == []
    assert llama_cpu_layer.layout_differences(lib, llama_cpu_layer.StepArgs) != []  # not LayerArgs' layout
    fields = llama_cpu_layer.LayerArgs._fields_

    class Removed(ctypes.Structure):
        _fields_ = [f for f in fields if f[0] != "split_len"]

    class Swapped(ctypes.Structure):
        _fields_ = [*fields[:-2], fields[-1], fields[-2]]  # scale before eps

    class Narrower(ctypes.Structure):  # the padding that follows keeps every offset
        _fields_ = [(name, ctypes.c_int32 if name == "num_heads" else kind) for name, kind in fields]

    n, size = len(fields), ctypes.sizeof(llama_cpu_layer.LayerArgs)
    split = [name for name, _ in fields].index("split_len")
    assert llama_cpu_layer.layout_differences(lib, Removed) == [
        f"size {size} in C++, {ctypes.sizeof(Removed)} here", f"field {split} is split_len in C++, {fields[split + 1][0]} here"]
    assert llama_cpu_layer.layout_differences(lib, Swapped) == [f"field {n - 2} is eps in C++, scale here"]
    at = llama_cpu_layer.LayerArgs.num_heads.offset
    assert llama_cpu_layer.layout_differences(lib, Narrower) == [f"num_heads at offset {at} size 8 in C++, offset {at} size 4 here"]


def test_a_layout_mismatch_leaves_every_layer_on_the_modules(tiny_model_dirs, monkeypatch, caplog):
    monkeypatch.setattr(llama_cpu_layer, "layout_differences", lambda lib, structure, layout_fn: ["size 8 in C++, 4 here"])
    assert llama_cpu_layer.load.__wrapped__() is None  # what load() does the first time, uncached
    assert "LayerArgs in llama_layer.cpp and llama_cpu_layer.py differ (size 8 in C++, 4 here)" in caplog.text
    monkeypatch.setattr(llama_cpu_layer, "load", llama_cpu_layer.load.__wrapped__)
    llm = LLM(str(tiny_model_dirs["mistral"]), dtype="float32", kv_cache_memory_bytes=8 << 20)
    assert all(layer.cpu_layer is None for layer in _layers(llm))
    assert llm.llm_engine.worker_info.kernel_plan.one_call_layers == 0
    assert llm.generate(prompt_token_ids=[[1, 2, 3]], use_tqdm=False)[0].outputs[0].token_ids


def test_the_layer_takes_decode_sized_steps_with_int64_positions(tiny_model_dirs):
    llm = LLM(str(tiny_model_dirs["mistral"]), dtype="bfloat16", kv_cache_memory_bytes=8 << 20)
    cpu_layer = _layers(llm)[0].cpu_layer
    x = torch.zeros(256, 128, dtype=torch.bfloat16)
    assert cpu_layer.accepts(x, torch.zeros(256, dtype=torch.int64))
    assert not cpu_layer.accepts(torch.zeros(257, 128, dtype=torch.bfloat16), torch.zeros(257, dtype=torch.int64))
    assert not cpu_layer.accepts(x, torch.zeros(256, dtype=torch.int32))
