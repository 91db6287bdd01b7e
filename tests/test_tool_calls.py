"""Tool calling on the default model with a Hermes-style chat template (docs/tool_chat_template_hermes.jinja;
SmolLM2-135M-Instruct's own template renders no tools): the round trip with the official openai client —
a `get_weather` tool, tool_choice "required", the call parsed, the result sent back, the final answer —
streamed and not; named functions; the parser; and the errors for what this server cannot do."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from kvserve.config import EngineConfig
from kvserve.entrypoints.openai.tool_parsers import HermesToolParser, ToolCallStream
from kvserve.models.default_model import default_model_path
from kvserve.tokenizer import load_tokenizer
from server_utils import KV_BYTES, ServerThread, assert_error

TEMPLATE = Path(__file__).resolve().parents[1] / "docs" / "tool_chat_template_hermes.jinja"
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40}, "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"]}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Get the current weather in a city", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "description": "Get the local time in a city",
                                      "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40}},
                                                     "required": ["city"]}}},
]
QUESTION = [{"role": "user", "content": "What is the weather like in Paris today?"}]


@pytest.fixture(scope="module")
def hermes_tokenizer(tmp_path_factory) -> Path:
    """The default model's tokenizer with the Hermes tool template as its chat template."""
    tokenizer = load_tokenizer(default_model_path())
    tokenizer.chat_template = TEMPLATE.read_text()
    out = tmp_path_factory.mktemp("hermes-tokenizer")
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def server(hermes_tokenizer: Path) -> ServerThread:
    srv = ServerThread(EngineConfig(tokenizer=str(hermes_tokenizer), kv_cache_memory_bytes=KV_BYTES), "smol",
                       tool_call_parser="hermes", enable_auto_tool_choice=True)
    yield srv
    srv.stop()


def streamed_message(chunks) -> tuple[str, list[dict], str]:
    """(content, tool calls, finish_reason) of a stream, accumulated as OpenAI's clients do (pieces joined by index)."""
    content, calls, finish = "", {}, None
    for chunk in chunks:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for piece in choice.delta.tool_calls or []:
                call = calls.setdefault(piece.index, {"id": "", "name": "", "arguments": ""})
                call["id"] += piece.id or ""
                call["name"] += piece.function.name or ""
                call["arguments"] += piece.function.arguments or ""
            finish = choice.finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish


@pytest.mark.parametrize("stream", [False, True])
def test_tool_call_round_trip_with_the_openai_client(server: ServerThread, stream: bool) -> None:
    client = server.client()
    kwargs = dict(model="smol", tools=TOOLS, max_tokens=80, temperature=0.0, parallel_tool_calls=False)
    first = client.chat.completions.create(messages=QUESTION, tool_choice="required", stream=stream, **kwargs)
    if stream:
        _, calls, finish = streamed_message(first)
    else:
        message = first.choices[0].message
        calls = [{"id": c.id, "name": c.function.name, "arguments": c.function.arguments} for c in message.tool_calls]
        finish = first.choices[0].finish_reason
    assert finish == "tool_calls" and len(calls) == 1
    call = calls[0]
    assert call["id"].startswith("call_") and call["name"] in ("get_weather", "get_time")
    arguments = json.loads(call["arguments"])
    jsonschema.validate(arguments, TOOLS[0]["function"]["parameters"] if call["name"] == "get_weather" else TOOLS[1]["function"]["parameters"])

    history = QUESTION + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": call["id"], "type": "function",
                                                               "function": {"name": call["name"], "arguments": call["arguments"]}}]},
        {"role": "tool", "tool_call_id": call["id"], "content": json.dumps({"city": "Paris", "temperature": 21, "unit": "celsius"})},
    ]
    final = client.chat.completions.create(messages=history, tool_choice="none", stream=stream, **kwargs)
    if stream:
        content, calls, finish = streamed_message(final)
    else:
        content, calls, finish = final.choices[0].message.content, final.choices[0].message.tool_calls, final.choices[0].finish_reason
    assert content and not calls and finish in ("stop", "length")
    server.wait_idle()


def test_the_tool_result_reaches_the_template(server: ServerThread) -> None:
    messages = QUESTION + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
                                                               "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 degrees"},
    ]
    tokens = server.post("/tokenize", json={"messages": messages}).json()["tokens"]
    text = server.engine.tokenizer.decode(tokens)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert "<tool_response>\nsunny, 21 degrees\n</tool_response>" in text


def test_a_named_function_is_called(server: ServerThread) -> None:
    response = server.client().chat.completions.create(
        model="smol", messages=QUESTION, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_time"}},
        max_tokens=60, temperature=0.7, seed=1, n=2,
    )
    for choice in response.choices:
        (call,) = choice.message.tool_calls
        assert call.function.name == "get_time" and "city" in json.loads(call.function.arguments)
    server.wait_idle()


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "bogus"}}}], "tool_choice": "required"}, "tools"),
        ({"tools": None, "tool_choice": "required"}, "tool_choice"),
        ({"messages": [{"role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function",
                                                                               "function": {"name": "f", "arguments": "{not json"}}]}]},
         "messages"),
    ],
)
def test_bad_tool_requests_are_400(server: ServerThread, extra: dict, param: str) -> None:
    body = {"messages": QUESTION, "tools": TOOLS, "max_tokens": 4, **extra}
    assert_error(server.post("/v1/chat/completions", json={k: v for k, v in body.items() if v is not None}), 400, param)


def test_a_template_without_tools_and_a_server_without_a_parser_say_so() -> None:
    plain = ServerThread(EngineConfig(kv_cache_memory_bytes=KV_BYTES), "plain")  # SmolLM2's own template: no tools
    try:
        assert_error(plain.post("/v1/chat/completions", json={"messages": QUESTION, "tools": TOOLS}), 400, "tools",
                     ("--tool-call-parser",))
        assert_error(plain.post("/v1/chat/completions", json={"messages": QUESTION, "tools": TOOLS, "tool_choice": "required"}), 400,
                     "tool_choice")
        shown = plain.post("/v1/chat/completions", json={"messages": QUESTION, "tools": TOOLS, "tool_choice": "none", "max_tokens": 2})
        assert_error(shown, 400, "tools", ("no tool support",))
    finally:
        plain.stop()


def test_hermes_parser_whole_and_streamed() -> None:
    text = ('Let me check.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>\n'
            '<tool_call>\n{"name": "get_time", "arguments": {"city": "Rome"}}\n</tool_call>')
    content, calls = HermesToolParser.extract(text)
    assert content == "Let me check." and [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris", "unit": "celsius"}), ("get_time", {"city": "Rome"})]
    assert HermesToolParser.extract("<tool_call>{broken</tool_call>") == ("<tool_call>{broken</tool_call>", [])
    for step in (1, 3, 7, len(text)):
        stream = ToolCallStream(HermesToolParser)
        pieces = [stream.feed(text[i : i + step]) for i in range(0, len(text), step)] + [stream.finish()]
        assert "".join(p[0] for p in pieces) == "Let me check."
        assert [c.name for p in pieces for c in p[1]] == ["get_weather", "get_time"]
    cut = ToolCallStream(HermesToolParser)  # a block the output's end left open still parses
    assert cut.feed('<tool_call>{"name": "f", "arguments": {}}') == ("", []) and [c.name for c in cut.finish()[1]] == ["f"]
