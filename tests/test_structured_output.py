"""Structured output: JSON mode, JSON schemas, regex and choice on the default model (SmolLM2-135M-Instruct);
every output parses and validates, greedy and sampled, n=2, through `LLM` and the server (streamed and not).
Also: unconstrained requests in a mixed batch keep their tokens, preemption and the mp executor keep the
constrained tokens (tiny model), the grammar may end an output, rollback, and bad constraints are refused."""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import pytest

from kvserve import LLM, SamplingParams
from kvserve.sampling_params import StructuredOutputsParams
from server_utils import ServerThread, assert_error, sse_events

FLAT = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0,
        "maximum": 120}}, "required": ["name", "age"]}
WITH_ENUM_AND_ARRAY = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 24}, "weather": {"enum": ["sunny", "rainy", "cloudy"]},
                   "temperatures": {"type": "array", "items": {"type": "integer", "minimum": -50, "maximum": 50}, "minItems": 1,
                                    "maxItems": 3}},
    "required": ["city", "weather", "temperatures"],
}
NESTED = {
    "type": "object",
    "properties": {
        "person": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20}, "role": {"enum": ["admin", "user", "guest"]}},
                   "required": ["name", "role"]},
        "tags": {"type": "array", "maxItems": 2, "items": {"type": "object", "properties": {"label": {"type": "string", "maxLength": 12},
                                                                                           "priority": {"enum": [1, 2, 3]}},
                                                           "required": ["label", "priority"]}},
    },
    "required": ["person", "tags"],
}
SCHEMAS = {
    "flat": (FLAT, "Describe a person as JSON with a name and an age."),
    "enum-array": (WITH_ENUM_AND_ARRAY, "Give the weather in a city as JSON: city, weather and temperatures."),
    "nested": (NESTED, "Describe a user account as JSON: the person (name, role) and up to two tags."),
}
ISO_DATE = r"\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])"
MAX_TOKENS = 120


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(kv_cache_memory_bytes=64 << 20)


def chat(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def valid(text: str, schema: dict | None) -> bool:
    value = json.loads(text)
    if schema is None:
        return isinstance(value, dict)
    jsonschema.validate(value, schema)
    return True


@pytest.mark.parametrize("name", SCHEMAS)
@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_json_schema_outputs_validate(llm: LLM, name: str, temperature: float) -> None:
    schema, prompt = SCHEMAS[name]
    params = SamplingParams(temperature=temperature, seed=3, n=2, max_tokens=MAX_TOKENS, structured_outputs=StructuredOutputsParams(json=schema))
    (out,) = llm.chat(chat(prompt), params, use_tqdm=False)
    for completion in out.outputs:
        assert completion.finish_reason == "stop", completion.text
        assert valid(completion.text, schema)


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_json_mode_outputs_are_objects(llm: LLM, temperature: float) -> None:
    params = SamplingParams(temperature=temperature, seed=3, n=2, max_tokens=MAX_TOKENS,
                            structured_outputs=StructuredOutputsParams(json_object=True))
    (out,) = llm.chat(chat("Give a JSON object with the name and the capital of France."), params, use_tqdm=False)
    for completion in out.outputs:
        assert valid(completion.text, None), completion.text


def test_compact_json_has_no_optional_whitespace(llm: LLM) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS,
                            structured_outputs=StructuredOutputsParams(json=FLAT, disable_any_whitespace=True))
    (out,) = llm.chat(chat(SCHEMAS["flat"][1]), params, use_tqdm=False)
    text = out.outputs[0].text
    assert valid(text, FLAT) and text == json.dumps(json.loads(text), ensure_ascii=False)  # xgrammar's ", " and ": "


def test_regex_and_choice(llm: LLM) -> None:
    date = SamplingParams(temperature=0.7, seed=1, n=2, max_tokens=20, structured_outputs=StructuredOutputsParams(regex=ISO_DATE))
    choice = SamplingParams(temperature=0.0, max_tokens=20, structured_outputs=StructuredOutputsParams(choice=["yes", "no", "maybe"]))
    dates, answer = llm.generate(["The date of the first moon landing was ", "Is the sky blue? Answer:"], [date, choice], use_tqdm=False)
    for completion in dates.outputs:
        assert re.fullmatch(ISO_DATE, completion.text) and completion.finish_reason == "stop"
    assert answer.outputs[0].text in ("yes", "no", "maybe") and answer.outputs[0].finish_reason == "stop"


def test_the_grammar_ends_an_output_that_ignores_eos(llm: LLM) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, structured_outputs=StructuredOutputsParams(choice=["red", "green"]))
    (out,) = llm.generate(["My favourite colour is "], params, use_tqdm=False)
    assert out.outputs[0].text in ("red", "green") and out.outputs[0].finish_reason == "stop"


def test_invalid_constraints_are_refused_before_anything_is_queued(llm: LLM) -> None:
    for bad, words in (({"json": {"type": "bogus"}}, "JSON schema"), ({"regex": "(a"}, "regex"), ({"grammar": "root ::= "}, "grammar")):
        with pytest.raises(ValueError, match=f"structured_outputs: the {words} does not compile"):
            llm.generate(["x"], SamplingParams(structured_outputs=StructuredOutputsParams(**bad)), use_tqdm=False)
    with pytest.raises(ValueError, match="exactly one of"):
        StructuredOutputsParams(regex="a", choice=["a"])
    assert not llm.llm_engine.has_unfinished_requests()


def test_rollback_undoes_accepted_tokens(llm: LLM) -> None:
    engine = llm.llm_engine
    state = engine.grammar_compiler.new_state(StructuredOutputsParams(choice=["yes", "no"]))
    tokens = engine.tokenizer.encode("yes", add_special_tokens=False)
    assert all(state.accept(t) for t in tokens)
    assert not state.accept(engine.tokenizer.encode("no", add_special_tokens=False)[0])  # refused: nothing changes
    state.rollback(len(tokens))
    assert all(state.accept(t) for t in engine.tokenizer.encode("no", add_special_tokens=False))


# ---- on the tiny llama in float32, whose greedy tokens do not depend on the batch: mixed batches, preemption and
# the multiprocess executor ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tiny_llama) -> LLM:
    return LLM(model=str(tiny_llama), dtype="float32")


def test_unconstrained_requests_in_a_mixed_batch_keep_their_tokens(tiny: LLM) -> None:
    prompts = ["Once upon a time", "The capital of France is", "def fibonacci(n):"]
    free = [SamplingParams(temperature=0.0, max_tokens=24), SamplingParams(temperature=0.8, seed=5, max_tokens=24),
            SamplingParams(temperature=0.8, seed=9, n=2, max_tokens=24)]
    alone = [tiny.generate([p], s, use_tqdm=False)[0] for p, s in zip(prompts, free)]
    constrained = SamplingParams(temperature=0.7, seed=2, n=2, max_tokens=40, structured_outputs=StructuredOutputsParams(json=FLAT))
    mixed = tiny.generate([prompts[0], "A person as JSON:", prompts[1], prompts[2]], [free[0], constrained, free[1], free[2]], use_tqdm=False)
    for before, after in zip(alone, [mixed[0], mixed[2], mixed[3]]):
        assert [c.token_ids for c in after.outputs] == [c.token_ids for c in before.outputs]
    assert all(json.loads(c.text) if c.finish_reason == "stop" else c.finish_reason == "length" for c in mixed[1].outputs)



def tiny_outputs(tiny: LLM) -> tuple[list[list[int]], int]:
    """Four constrained requests (greedy and seeded) on the tiny llama: their tokens, and the preemptions they met."""
    params = [SamplingParams(temperature=0.0 if i % 2 else 0.9, seed=i, max_tokens=40, structured_outputs=StructuredOutputsParams(json=FLAT))
              for i in range(4)]
    outs = tiny.generate([f"prompt {i}" for i in range(4)], params, use_tqdm=False)
    assert all(o.outputs[0].finish_reason == "length" or valid(o.outputs[0].text, FLAT) for o in outs)
    return [o.outputs[0].token_ids for o in outs], tiny.llm_engine.stats().num_preemptions


def test_preemption_keeps_the_grammar_state(tiny: LLM, tiny_llama) -> None:
    roomy, _ = tiny_outputs(tiny)
    tight, preempted = tiny_outputs(LLM(model=str(tiny_llama), dtype="float32", num_gpu_blocks_override=14, block_size=4))
    assert preempted > 0 and tight == roomy


@pytest.mark.slow  # a spawned worker process takes ~10 s to start
def test_the_multiprocess_executor_gets_the_masks_with_the_step(tiny: LLM, tiny_llama) -> None:
    here, _ = tiny_outputs(tiny)
    spawned_llm = LLM(model=str(tiny_llama), dtype="float32", distributed_executor_backend="mp")
    try:
        spawned, _ = tiny_outputs(spawned_llm)
    finally:
        spawned_llm.llm_engine.shutdown()
    assert spawned == here


# ---- over HTTP -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(llm: LLM) -> ServerThread:
    srv = ServerThread(llm.llm_engine, "smol")
    yield srv
    srv.stop()


@pytest.mark.parametrize("stream", [False, True])
def test_response_format_json_schema_over_http(server: ServerThread, stream: bool) -> None:
    client = server.client()
    schema, prompt = SCHEMAS["enum-array"]
    kwargs = dict(model="smol", messages=chat(prompt), n=2, temperature=0.7, seed=4, max_tokens=MAX_TOKENS,
                  response_format={"type": "json_schema", "json_schema": {"name": "weather", "schema": schema, "strict": True}})
    if stream:
        texts = ["", ""]
        for chunk in client.chat.completions.create(stream=True, **kwargs):
            for choice in chunk.choices:
                texts[choice.index] += choice.delta.content or ""
    else:
        texts = [c.message.content for c in client.chat.completions.create(**kwargs).choices]
    assert all(valid(t, schema) for t in texts)
    server.wait_idle()


@pytest.mark.parametrize("stream", [False, True])
def test_vllm_fields_on_completions(server: ServerThread, stream: bool) -> None:
    client = server.client()
    cases = [({"guided_regex": ISO_DATE}, lambda t: re.fullmatch(ISO_DATE, t)), ({"guided_choice": ["yes", "no"]}, lambda t: t in ("yes", "no")),
             ({"structured_outputs": {"json": FLAT}}, lambda t: valid(t, FLAT)), ({"guided_json": FLAT}, lambda t: valid(t, FLAT)),
             ({"response_format": {"type": "json_object"}}, lambda t: valid(t, None))]
    for extra, check in cases:
        prompt = "The date of the first moon landing was " if "guided_regex" in extra else "Here is a JSON object describing a person:\n"
        response = client.completions.create(model="smol", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0.0,
                                             stream=stream, extra_body=extra)
        text = "".join(c.choices[0].text for c in response if c.choices) if stream else response.choices[0].text
        assert check(text), (extra, text)
    server.wait_idle()


def test_guided_grammar_over_http(server: ServerThread) -> None:
    grammar = 'root ::= "The answer is " ("yes" | "no") "."'
    response = server.post("/v1/completions", json={"prompt": "Q: is water wet? A:", "guided_grammar": grammar, "max_tokens": 20})
    assert response.json()["choices"][0]["text"] in ("The answer is yes.", "The answer is no.")


@pytest.mark.parametrize(
    "body, param",
    [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}}}, "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
        ({"response_format": {"type": "yaml"}}, "response_format"),
        ({"guided_regex": "(a"}, "guided_regex"),
        ({"guided_choice": []}, "guided_choice"),
        ({"structured_outputs": {"json": {"type": "object"}, "regex": "a"}}, "structured_outputs"),
        ({"structured_outputs": {"jsonn": {}}}, "structured_outputs"),
        ({"guided_json": {"type": "object"}, "guided_regex": "a"}, "guided_regex"),
    ],
)
def test_invalid_constraints_are_400_naming_the_field(server: ServerThread, body: dict, param: str) -> None:
    for path, base in (("/v1/chat/completions", {"messages": chat("hi")}), ("/v1/completions", {"prompt": "hi"})):
        assert_error(server.post(path, json={**base, **body}), 400, param)
    server.wait_idle()


def test_a_stream_of_json_ends_with_stop(server: ServerThread) -> None:
    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=30, json={
        "messages": chat(SCHEMAS["flat"][1]), "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True,
        "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": FLAT}},
    }) as response:
        events = sse_events(response)
    assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "stop"
    assert valid("".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1] if e["choices"]), FLAT)
