"""vLLM's Python API as its users type it: keywords, prompt dicts, LLM.chat, beam search on dicts."""

from __future__ import annotations

import json
import logging
import os
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
        assert "kvserve.stats: request" not in server.output()  # --disable-log-requests
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


# ---- the KV cache sized by need ---------------------------------------------------------------------------------


def test_the_default_kv_cache_is_what_max_num_seqs_full_sequences_need(tiny_llama, caplog):
    with caplog.at_level(logging.INFO, logger="kvserve"):
        engine = LLM(str(tiny_llama), dtype="float32", max_num_seqs=3, max_model_len=100).llm_engine
    assert engine.executor.num_blocks == 3 * 7  # 3 sequences x ceil(100 / 16) blocks, far below the memory share
    assert any(m.startswith("KV cache sized by need: max_num_seqs 3 x max_model_len 100 tokens fit in 21 blocks")
               for m in caplog.messages)
    per_block = engine.kv_bytes_per_token() * engine.config.block_size
    given = LLM(str(tiny_llama), dtype="float32", max_num_seqs=3, max_model_len=100, kv_cache_memory_bytes=4 << 20)
    assert given.llm_engine.executor.num_blocks == (4 << 20) // per_block  # a size given is taken as given


# ---- flags: --chat-template, --generation-config, --response-role, -t, --port, long --max-model-len ------------------


def test_chat_template_takes_a_file_or_a_string_on_every_chat_command(chat_llama, tmp_path):
    from kvserve.entrypoints.cli import build_parser

    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% endfor %}"
    file = tmp_path / "template.jinja"
    file.write_text(template)
    for argv in (["serve", "x"], ["generate", "hi"], ["chat"]):
        assert build_parser().parse_args([*argv, "--chat-template", str(file)]).chat_template == str(file)
    for value in (str(file), template):
        llm = LLM(str(chat_llama), dtype="float32", kv_cache_memory_bytes=4 << 20, chat_template=value)
        (out,) = llm.chat([{"role": "user", "content": "Hi"}], GREEDY, use_tqdm=False)
        assert out.prompt == "[user] Hi"
    with pytest.raises(ValueError, match="chat_template 'no/such/file.jinja' is neither a file nor a template"):
        LLM(str(chat_llama), chat_template="no/such/file.jinja")
    with pytest.raises(ValueError, match="chat_template does not parse as a Jinja template"):
        LLM(str(chat_llama), chat_template="{% for m in messages %}")


def test_generate_chat_uses_the_chat_template_flag(chat_llama):
    result = subprocess.run([sys.executable, "-m", "kvserve.entrypoints.cli", "generate", "--chat", "Hi", "-m", str(chat_llama),
                             "--dtype", "float32", "--max-tokens", "2", "--kv-cache-memory-bytes", "4MiB",
                             "--chat-template", "{{ raise_exception('the flag template ran') }}"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2 and "the chat template failed on these messages: the flag template ran" in result.stderr


def test_generation_config_gives_the_default_sampling_params(chat_llama, tmp_path):
    model = shutil.copytree(chat_llama, tmp_path / "with-defaults")
    config = json.loads((model / "generation_config.json").read_text())
    config.update(temperature=0.6, top_p=0.9, top_k=20, repetition_penalty=1.05, max_new_tokens=7)
    (model / "generation_config.json").write_text(json.dumps(config))
    auto = LLM(str(model), dtype="float32", kv_cache_memory_bytes=4 << 20)
    params = auto.get_default_sampling_params()
    assert (params.temperature, params.top_p, params.top_k, params.repetition_penalty, params.max_tokens) == \
        (0.6, 0.9, 20, 1.05, 7)
    assert len(auto.generate(["Hi"], use_tqdm=False)[0].outputs[0].token_ids) <= 7
    ignored = LLM(str(model), dtype="float32", kv_cache_memory_bytes=4 << 20, generation_config="vllm")
    assert ignored.get_default_sampling_params().temperature == SamplingParams().temperature
    elsewhere = LLM(str(chat_llama), dtype="float32", kv_cache_memory_bytes=4 << 20, generation_config=str(model))
    assert elsewhere.get_default_sampling_params().top_k == 20
    with pytest.raises(ValueError, match="generation_config must be auto, vllm or a folder holding a generation_config.json"):
        LLM(str(chat_llama), generation_config=str(tmp_path / "nowhere"))


def test_the_server_takes_generation_config_defaults_and_the_response_role(chat_llama, tmp_path):
    model = shutil.copytree(chat_llama, tmp_path / "served")
    config = json.loads((model / "generation_config.json").read_text())
    config.update(max_new_tokens=2)
    (model / "generation_config.json").write_text(json.dumps(config))
    handle = ServerThread(EngineConfig(model=str(model), dtype="float32", kv_cache_memory_bytes=4 << 20), None,
                          response_role="narrator")
    try:
        chat = {"messages": [{"role": "user", "content": "Hi"}], "temperature": 0, "ignore_eos": True}
        reply = handle.post("/v1/chat/completions", json=chat).json()
        assert reply["choices"][0]["message"]["role"] == "narrator"
        assert reply["usage"]["completion_tokens"] == 2  # the model's max_new_tokens where the request gives none
        longer = handle.post("/v1/chat/completions", json={**chat, "max_tokens": 4}).json()
        assert longer["usage"]["completion_tokens"] == 4
        with httpx.stream("POST", handle.url + "/v1/chat/completions", json={**chat, "stream": True}, timeout=TIMEOUT) as r:
            first = json.loads(next(line for line in r.iter_lines() if line.startswith("data: "))[len("data: "):])
        assert first["choices"][0]["delta"]["role"] == "narrator"
        handle.wait_idle()
    finally:
        handle.stop()


def test_threads_port_and_response_role_flags():
    from kvserve.config import available_cores
    from kvserve.engine_args import engine_config_from_args
    from kvserve.entrypoints.cli import build_parser

    args = build_parser().parse_args(["serve", "m", "--response-role", "bot", "-t", "3", "--generation-config", "vllm"])
    config = engine_config_from_args(args)
    assert (args.port, args.response_role, config.num_threads, config.generation_config) == (8000, "bot", 3, "vllm")
    default = engine_config_from_args(build_parser().parse_args(["generate", "hi"]))
    assert default.num_threads == available_cores() == len(os.sched_getaffinity(0))


def test_max_model_len_above_the_models_needs_the_environment_variable(tiny_llama, monkeypatch):
    monkeypatch.delenv("KVSERVE_ALLOW_LONG_MAX_MODEL_LEN", raising=False)
    with pytest.raises(ValueError, match="max_model_len must be <= the model's context length 512, got 1024 "
                                         "\\(set KVSERVE_ALLOW_LONG_MAX_MODEL_LEN=1 to override\\)"):
        LLM(str(tiny_llama), max_model_len=1024)
    monkeypatch.setenv("KVSERVE_ALLOW_LONG_MAX_MODEL_LEN", "1")
    llm = LLM(str(tiny_llama), dtype="float32", max_model_len=1024, kv_cache_memory_bytes=4 << 20)
    assert llm.llm_engine.config.max_model_len == 1024


@pytest.mark.parametrize("path", ["/v1/embeddings", "/v1/responses"])
def test_endpoints_kvserve_does_not_serve_answer_a_clear_error(tiny_llama, path):
    handle = ServerThread(EngineConfig(model=str(tiny_llama), dtype="float32", kv_cache_memory_bytes=4 << 20), None)
    try:
        error = assert_error(handle.post(path, json={"model": "x", "input": "Hi"}), 501, None,
                             (f"kvserve does not serve {path}", "/v1/chat/completions"))
        assert error["code"] == "unsupported_endpoint"
    finally:
        handle.stop()
