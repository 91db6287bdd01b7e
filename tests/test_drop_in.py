"""vLLM's Python API as its users type it: keywords, prompt dicts, LLM.chat, beam search on dicts."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import httpx
import pytest

from kvserve import LLM, BeamSearchParams, EngineConfig, SamplingParams
from kvserve.executor.worker import kv_share_of_memory
from server_utils import KV_BYTES, TIMEOUT, ServeProcess, ServerThread, assert_error

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(chat_llama):
    return LLM(str(chat_llama), dtype="float32", kv_cache_memory_bytes=16 << 20, tensor_parallel_size=1,
               trust_remote_code=True, enforce_eager=True, seed=0, max_model_len=256)


def test_vllm_keywords_are_accepted(llm):
    config = llm.llm_engine.config
    assert (config.trust_remote_code, config.enforce_eager, config.max_model_len) == (True, True, 256)


@pytest.mark.parametrize("field, value, allowed", [
    ("gpu_memory_utilization", 0, "a number in (0, 1]"),
    ("gpu_memory_utilization", 1.5, "a number in (0, 1]"),
    ("gpu_memory_utilization", float("nan"), "a number in (0, 1]"),
    ("enforce_eager", "yes", "True or False"),
    ("trust_remote_code", 1, "True or False"),
])
def test_vllm_keywords_are_validated(field, value, allowed):
    with pytest.raises(ValueError, match=rf"{field} must be {__import__('re').escape(allowed)}"):
        EngineConfig(**{field: value})


def test_a_model_that_needs_its_own_code_is_refused_by_name(tiny_llama, tmp_path):
    model = shutil.copytree(tiny_llama, tmp_path / "custom")
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="my_custom_arch", auto_map={"AutoConfig": "configuration_custom.CustomConfig"})
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="needs the model's own code .*trust_remote_code cannot help"):
        LLM(str(model), trust_remote_code=True)


def test_an_auto_map_beside_a_known_model_type_loads_as_usual(tiny_llama, tmp_path):
    model = shutil.copytree(tiny_llama, tmp_path / "mapped")
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_llama.LlamaConfig"}
    (model / "config.json").write_text(json.dumps(config))
    llm = LLM(str(model), dtype="float32", kv_cache_memory_bytes=4 << 20)
    assert llm.generate([[3, 4, 5]], GREEDY, use_tqdm=False)[0].outputs[0].token_ids


def test_gpu_memory_utilization_is_the_kv_share_of_memory():
    gib = 1 << 30
    # CPU: the fraction of the available RAM, in place of the default 30% (capped at 4 GiB)
    assert kv_share_of_memory(None, 100 * gib, 0, on_cuda=False) == 4 * gib
    assert kv_share_of_memory(0.5, 100 * gib, 0, on_cuda=False) == 50 * gib
    # CUDA, as vLLM means it: weights + KV fill that fraction of the device; 30 GiB of 140 are in use
    assert kv_share_of_memory(0.9, 110 * gib, 140 * gib, on_cuda=True) == int(140 * gib * 0.9) - 30 * gib
    with pytest.raises(ValueError, match="gpu_memory_utilization=0.2 leaves no room for the KV cache"):
        kv_share_of_memory(0.2, 110 * gib, 140 * gib, on_cuda=True)


def test_gpu_memory_utilization_sizes_the_cpu_kv_cache(tiny_llama, monkeypatch):
    monkeypatch.setattr("kvserve.executor.worker.available_memory_bytes", lambda: 64 << 20)
    llm = LLM(str(tiny_llama), dtype="float32", gpu_memory_utilization=0.5)
    engine = llm.llm_engine
    assert engine.executor.num_blocks == (32 << 20) // (engine.kv_bytes_per_token() * engine.config.block_size)


def test_prompt_dicts_equal_strings_and_token_ids(llm):
    tokenizer = llm.get_tokenizer()
    ids = tokenizer("Hi there").input_ids
    by_text, by_dict, by_ids, by_both = llm.generate(
        ["Hi there", {"prompt": "Hi there"}, {"prompt_token_ids": ids}, {"prompt": "Hi there", "prompt_token_ids": ids}],
        GREEDY, use_tqdm=False,
    )
    assert by_text.outputs[0].token_ids == by_dict.outputs[0].token_ids == by_ids.outputs[0].token_ids
    assert by_ids.prompt_token_ids == ids and by_ids.prompt is None and by_both.prompt == "Hi there"
    single = llm.generate({"prompt_token_ids": ids}, GREEDY, use_tqdm=False)
    assert single[0].outputs[0].token_ids == by_text.outputs[0].token_ids


@pytest.mark.parametrize("prompt, message", [
    ({"prompt_token_ids": [1], "multi_modal_data": {}}, "prompt 0: unsupported key\\(s\\) 'multi_modal_data'"),
    ({}, 'prompt 0: a prompt dict needs "prompt"'),
    ({"prompt": 5}, 'prompt 0: "prompt" must be a string'),
    ({"prompt_token_ids": "1 2"}, 'prompt 0: "prompt_token_ids" must be a list of ints'),
])
def test_bad_prompt_dicts_are_refused_by_name(llm, prompt, message):
    with pytest.raises(ValueError, match=message):
        llm.generate([prompt], GREEDY, use_tqdm=False)


def test_chat_equals_generate_on_the_rendered_template(llm):
    tokenizer = llm.get_tokenizer()
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    text = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False).input_ids
    expected = llm.generate([{"prompt_token_ids": ids}], GREEDY, use_tqdm=False)[0]
    (one,) = llm.chat(conversation, GREEDY, use_tqdm=False)
    assert one.prompt == text and one.prompt_token_ids == ids
    assert one.outputs[0].token_ids == expected.outputs[0].token_ids
    several = llm.chat([conversation, [{"role": "user", "content": "Bye"}]], GREEDY, use_tqdm=False)
    assert len(several) == 2 and several[0].outputs[0].token_ids == expected.outputs[0].token_ids
    plain = llm.chat(conversation, GREEDY, use_tqdm=False, chat_template="{{ messages[-1]['content'] }}",
                     add_generation_prompt=False)
    assert plain[0].prompt == "Hello"


def test_chat_errors_name_the_conversation(llm):
    with pytest.raises(ValueError, match="conversation 0 of 1: cannot render it with the chat template"):
        llm.chat([{"role": "user", "content": "x"}], GREEDY, use_tqdm=False,
                 chat_template="{{ raise_exception('roles must alternate') }}")
    with pytest.raises(ValueError, match="messages must hold a conversation"):
        llm.chat([], GREEDY)


def test_beam_search_takes_prompt_dicts(llm):
    params = BeamSearchParams(beam_width=2, max_tokens=4)
    ids = llm.get_tokenizer()("Hi").input_ids
    by_text, by_dict, by_ids = llm.beam_search(["Hi", {"prompt": "Hi"}, {"prompt_token_ids": ids}], params)
    assert [b.tokens for b in by_text.sequences] == [b.tokens for b in by_dict.sequences] == [b.tokens for b in by_ids.sequences]


# ---- the command line: vLLM's and llama-server's flags -------------------------------------------------------


def test_serve_parses_the_flags_vllm_and_llama_server_users_type():
    from kvserve.engine_args import engine_config_from_args
    from kvserve.entrypoints.cli import build_parser

    args = build_parser().parse_args([
        "serve", "some/model", "-c", "8k", "-np", "4", "--seed", "7", "--kv-cache-memory-bytes", "64MiB",
        "--gpu-memory-utilization", "0.5", "--trust-remote-code", "--enforce-eager", "--enable-prefix-caching",
        "--no-enable-chunked-prefill", "--served-model-name", "a", "b", "--uvicorn-log-level", "debug",
        "--disable-log-requests", "--skip-tokenizer-init", "--max-num-batched-tokens", "8K",
    ])
    assert (args.model_tag, args.served_model_name, args.uvicorn_log_level, args.disable_log_requests, args.port) == \
        ("some/model", ["a", "b"], "debug", True, 8000)
    config = engine_config_from_args(args)
    assert (config.max_model_len, config.max_num_seqs, config.seed, config.kv_cache_memory_bytes) == (8000, 4, 7, 64 << 20)
    assert (config.gpu_memory_utilization, config.trust_remote_code, config.enforce_eager, config.skip_tokenizer_init) == \
        (0.5, True, True, True)
    assert (config.enable_prefix_caching, config.enable_chunked_prefill, config.max_num_batched_tokens) == (True, False, 8192)


def test_generate_keeps_seed_for_sampling_and_takes_dash_m():
    from kvserve.engine_args import engine_config_from_args
    from kvserve.entrypoints.cli import build_parser

    args = build_parser().parse_args(["generate", "Hi", "-m", "dir", "--seed", "5", "--no-enable-prefix-caching"])
    config = engine_config_from_args(args)
    assert (args.prompt, config.model, args.seed, config.seed, config.enable_prefix_caching) == ("Hi", "dir", 5, 0, False)


def test_sizes_take_suffixes_and_bad_ones_name_the_flag():
    from kvserve.validation import parse_bytes, parse_tokens

    assert parse_tokens("8k") == 8000 and parse_tokens("8K") == 8192 and parse_tokens("1.5k") == 1500
    assert parse_tokens("4096") == 4096 and parse_bytes("64MiB") == 64 << 20 and parse_bytes("4gb") == 4e9
    with pytest.raises(ValueError, match="expected a whole number of tokens"):
        parse_tokens("1.0001k")
    result = subprocess.run([sys.executable, "-m", "kvserve.entrypoints.cli", "generate", "hi",
                             "--kv-cache-memory-bytes", "12parsecs"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "argument --kv-cache-memory-bytes: --kv-cache-memory-bytes: got '12parsecs'" in result.stderr


def test_version():
    from kvserve import __version__

    result = subprocess.run([sys.executable, "-m", "kvserve.entrypoints.cli", "--version"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == f"kvserve {__version__}"


def test_serve_takes_a_positional_model_and_several_served_names(tiny_llama, tmp_path):
    server = ServeProcess([str(tiny_llama), "--dtype", "float32", "--kv-cache-memory-bytes", "8MiB", "-c", "256",
                           "--served-model-name", "first", "second", "--seed", "3", "--disable-log-requests",
                           "--uvicorn-log-level", "warning"], tmp_path / "serve.log")
    try:
        models = httpx.get(server.url + "/v1/models", timeout=TIMEOUT).json()["data"]
        assert [(m["id"], m["root"], m["max_model_len"]) for m in models] == [("first", "first", 256), ("second", "first", 256)]
        for name in ("first", "second"):
            reply = httpx.post(server.url + "/v1/completions", json={"model": name, "prompt": "Hi", "max_tokens": 2},
                               timeout=TIMEOUT)
            assert reply.status_code == 200 and reply.json()["model"] == "first"
        error = httpx.post(server.url + "/v1/completions", json={"model": "third", "prompt": "Hi"}, timeout=TIMEOUT)
        assert error.status_code == 404 and "serves `first`, `second`" in error.json()["error"]["message"]
    finally:
        server.stop()


def test_the_model_given_twice_differently_is_refused(tiny_llama):
    result = subprocess.run([sys.executable, "-m", "kvserve.entrypoints.cli", "serve", str(tiny_llama), "--model", "other"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "the model is given twice" in result.stderr


# ---- skip_tokenizer_init: a model directory without tokenizer files --------------------------------------------


@pytest.fixture(scope="module")
def no_tokenizer_model(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("bare") / "model"
    out.mkdir()
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        if (tiny_llama / name).exists():
            shutil.copy(tiny_llama / name, out / name)
    return out


def test_skip_tokenizer_init_runs_token_id_prompts(no_tokenizer_model, tiny_llama):
    with pytest.raises(ValueError, match="cannot load a tokenizer"):
        LLM(str(no_tokenizer_model), dtype="float32", kv_cache_memory_bytes=4 << 20)
    bare = LLM(str(no_tokenizer_model), dtype="float32", kv_cache_memory_bytes=4 << 20, skip_tokenizer_init=True)
    full = LLM(str(tiny_llama), dtype="float32", kv_cache_memory_bytes=4 << 20)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=1)
    (out,) = bare.generate([{"prompt_token_ids": [3, 4, 5]}], params, use_tqdm=False)
    (expected,) = full.generate([{"prompt_token_ids": [3, 4, 5]}], params, use_tqdm=False)
    assert out.outputs[0].token_ids == expected.outputs[0].token_ids and out.outputs[0].text == ""
    assert all(lp.decoded_token is None for entry in out.outputs[0].logprobs for lp in entry.values())
    with pytest.raises(ValueError, match="prompt 0 of 1: prompt is text, but skip_tokenizer_init=True loaded no tokenizer"):
        bare.generate(["Hi"], params, use_tqdm=False)
    with pytest.raises(ValueError, match="stop need the tokenizer"):
        bare.generate([[3, 4]], SamplingParams(stop=["x"]), use_tqdm=False)
    with pytest.raises(ValueError, match="chat\\(\\) needs the tokenizer"):
        bare.chat([{"role": "user", "content": "Hi"}])


def test_skip_tokenizer_init_server_answers_text_requests_with_400(no_tokenizer_model):
    handle = ServerThread(EngineConfig(model=str(no_tokenizer_model), dtype="float32", kv_cache_memory_bytes=KV_BYTES,
                                       skip_tokenizer_init=True), None)
    try:
        ok = handle.post("/v1/completions", json={"prompt": [3, 4, 5], "max_tokens": 3})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3
        assert_error(handle.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 3}), 400, "prompt",
                     ("--skip-tokenizer-init",))
        assert_error(handle.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}]}), 400,
                     "prompt", ("--skip-tokenizer-init",))
        handle.wait_idle()
    finally:
        handle.stop()
