"""vLLM's Python API as its users type it: keywords, prompt dicts, LLM.chat, beam search on dicts."""

from __future__ import annotations

import json
import shutil

import pytest
from transformers import AutoTokenizer

from kvserve import LLM, BeamSearchParams, EngineConfig, SamplingParams
from kvserve.executor.worker import kv_share_of_memory

CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant:{% endif %}"
)
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def chat_llama(tiny_llama, tmp_path_factory):
    out = shutil.copytree(tiny_llama, tmp_path_factory.mktemp("chat") / "model")
    tokenizer = AutoTokenizer.from_pretrained(out)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(out)
    return out


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
