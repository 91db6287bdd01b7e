"""Loading: sharded safetensors, pytorch_model.bin, dummy weights, dtypes, and errors that name the culprit."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from kvserve import LLM, SamplingParams
from kvserve.models.loader import resolve_model_path
from oracle import random_prompts

PROMPTS = random_prompts([7, 33], seed=21)
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def _tokens(llm: LLM) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY, use_tqdm=False)]


@pytest.fixture(scope="module")
def reference_tokens(tiny_llama):
    return _tokens(LLM(str(tiny_llama), dtype="float32", kv_cache_memory_bytes=16 << 20))


def _copy_without_weights(src, dst):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors"))
    return dst


def test_sharded_safetensors(tiny_llama, tmp_path, reference_tokens):
    state = load_file(tiny_llama / "model.safetensors")
    out = _copy_without_weights(tiny_llama, tmp_path / "sharded")
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file, keys in shards.items():
        save_file({k: state[k] for k in keys}, out / file, metadata={"format": "pt"})
        weight_map.update({k: file for k in keys})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert _tokens(LLM(str(out), dtype="float32", kv_cache_memory_bytes=16 << 20)) == reference_tokens


def test_pytorch_model_bin(tiny_llama, tmp_path, reference_tokens):
    state = load_file(tiny_llama / "model.safetensors")
    out = _copy_without_weights(tiny_llama, tmp_path / "bin")
    torch.save(state, out / "pytorch_model.bin")
    assert _tokens(LLM(str(out), dtype="float32", kv_cache_memory_bytes=16 << 20)) == reference_tokens


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_runs_and_mostly_agrees(tiny_llama, dtype, reference_tokens):
    llm = LLM(str(tiny_llama), dtype=dtype, kv_cache_memory_bytes=16 << 20)
    assert llm.llm_engine.executor.worker.runner.kv_caches[0][0].dtype == getattr(torch, dtype)
    tokens = _tokens(llm)
    assert all(len(t) == 12 for t in tokens)
    assert tokens[0][:2] == reference_tokens[0][:2]


def test_dummy_weights_have_the_real_shapes(tiny_llama):
    llm = LLM(str(tiny_llama), dtype="float32", load_format="dummy", kv_cache_memory_bytes=16 << 20)
    out = llm.generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY, use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 12 for o in out)


def test_unknown_architecture(tiny_llama, tmp_path):
    out = shutil.copytree(tiny_llama, tmp_path / "weird")
    config = json.loads((out / "config.json").read_text())
    config["architectures"] = ["FancyNewForCausalLM"]
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unsupported architecture.*FancyNewForCausalLM"):
        LLM(str(out), dtype="float32")


def test_truncated_safetensors_names_the_file(tiny_llama, tmp_path):
    out = shutil.copytree(tiny_llama, tmp_path / "truncated")
    weights = out / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors"):
        LLM(str(out), dtype="float32")


def test_shape_mismatch_names_the_tensor(tiny_llama, tmp_path):
    out = _copy_without_weights(tiny_llama, tmp_path / "mismatch")
    state = load_file(tiny_llama / "model.safetensors")
    state["model.layers.1.mlp.down_proj.weight"] = state["model.layers.1.mlp.down_proj.weight"][:, :-1].contiguous()
    save_file(state, out / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj\.weight"):
        LLM(str(out), dtype="float32")


def test_missing_tensor_is_reported(tiny_llama, tmp_path):
    out = _copy_without_weights(tiny_llama, tmp_path / "missing")
    state = load_file(tiny_llama / "model.safetensors")
    del state["model.layers.0.self_attn.k_proj.weight"]
    save_file(state, out / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing.*model\.layers\.0\.self_attn\.qkv_proj\.weight\[shard 1\]"):
        LLM(str(out), dtype="float32")


def test_missing_model_and_offline_hub(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="does not exist"):
        resolve_model_path(str(tmp_path / "nope" / "model"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ValueError, match="not in the local Hugging Face cache"):
        resolve_model_path("some-org/some-model")


def test_engine_config_rejects_bad_values():
    from kvserve import EngineConfig

    for kwargs, name in [({"block_size": 0}, "block_size"), ({"max_num_seqs": 0}, "max_num_seqs"),
                         ({"dtype": "int3"}, "dtype"), ({"load_format": "zip"}, "load_format"),
                         ({"kv_cache_memory_bytes": -1}, "kv_cache_memory_bytes")]:
        with pytest.raises(ValueError, match=name):
            EngineConfig(**kwargs)


@pytest.mark.parametrize("native_bf16", [False, True])
def test_auto_dtype_on_cpu_follows_bf16_support(monkeypatch, native_bf16):
    from kvserve import config

    monkeypatch.setattr(config, "cpu_supports_bf16", lambda: native_bf16)
    expected_for_fp32 = torch.bfloat16 if native_bf16 else torch.float32
    assert config.resolve_dtype("auto", torch.float32, "cpu") == expected_for_fp32
    assert config.resolve_dtype("auto", None, "cpu") == expected_for_fp32
    assert config.resolve_dtype("auto", torch.float16, "cpu") == torch.bfloat16
    assert config.resolve_dtype("auto", torch.bfloat16, "cpu") == torch.bfloat16
    assert config.resolve_dtype("auto", torch.float32, "cuda") == torch.float32  # GPUs follow the checkpoint
    assert config.resolve_dtype("float32", torch.bfloat16, "cpu") == torch.float32  # an explicit dtype wins


@pytest.mark.parametrize("native_bf16", [False, True])
def test_the_log_says_which_dtype_and_why(monkeypatch, caplog, tiny_llama, native_bf16):
    import logging

    from kvserve import EngineConfig, config
    from kvserve.models.loader import load_hf_config

    monkeypatch.setattr(config, "cpu_supports_bf16", lambda: native_bf16)
    engine_config = EngineConfig(model=str(tiny_llama), device="cpu")
    with caplog.at_level(logging.INFO, logger="kvserve"):
        engine_config.resolve(load_hf_config(str(tiny_llama)))  # a float32 checkpoint
    expected = "activations in bfloat16 (dtype=auto: this CPU has bf16" if native_bf16 else \
        "activations in float32 (dtype=auto: no bf16 dot products on this CPU"
    assert expected in caplog.text
