"""Tool calls in a model's text: parsing them out (whole, or as they stream) and the grammar that forces them.

A model trained for tools writes its calls in its own syntax, which its chat
template teaches it; `--tool-call-parser` names that syntax, as in vLLM. The one
here is Hermes' (Qwen2.5, Hermes 2/3, SmolLM2 with a tool template, many others):

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

one block per call. Text outside the blocks is the message's content. A block
whose JSON does not parse stays content (the model's text is never lost).

For `tool_choice` "required" or a named function the output is constrained by
a grammar (`tool_call_grammar`, an xgrammar structural tag) to one or more such
blocks, each naming a given tool and holding arguments that follow its JSON
schema, so the call always parses.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from kvserve.sampling_params import StructuredOutputsParams

_START, _END = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)


@dataclass
class ParsedCall:
    """One call: its id (made here, as OpenAI's `call_...`), the function's name and its arguments as JSON text."""

    name: str
    arguments: str
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")


def _parse_block(body: str) -> ParsedCall | None:
    """The call a block's JSON spells, or None when it is not {"name": str, "arguments": object}."""
    try:
        value = json.loads(body)
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if not isinstance(arguments, dict):
        return None
    return ParsedCall(value["name"], json.dumps(arguments, ensure_ascii=False))


class HermesToolParser:
    """`<tool_call>{json}</tool_call>` blocks."""

    name = "hermes"

    @staticmethod
    def extract(text: str) -> tuple[str | None, list[ParsedCall]]:
        """(content, calls) of a whole output. Content is the text outside the parsed blocks, stripped (None
        when nothing is left); a block that does not parse, or an unclosed one whose JSON is cut, stays in it."""
        calls: list[ParsedCall] = []
        content: list[str] = []
        position = 0
        for match in _BLOCK.finditer(text):
            call = _parse_block(match.group(1))
            if call is None:
                continue
            content.append(text[position : match.start()])
            calls.append(call)
            position = match.end()
        content.append(text[position:])
        rest = "".join(content).strip()
        return (rest or None), calls

    @staticmethod
    def grammar(tools: list[dict[str, Any]], parallel: bool) -> StructuredOutputsParams:
        """Output = one call (or, with `parallel`, several separated by newlines) of one of `tools`, each's
        arguments following its `parameters` schema."""
        tags = [
            {
                "type": "tag",
                "begin": f'{_START}\n{{"name": {json.dumps(tool["name"], ensure_ascii=False)}, "arguments": ',
                "content": {"type": "json_schema", "json_schema": tool.get("parameters") or {"type": "object"}},
                "end": f"}}\n{_END}",
            }
            for tool in tools
        ]
        format_ = {"type": "tags_with_separator", "tags": tags, "separator": "\n", "at_least_one": True,
                   "stop_after_first": not parallel}
        return StructuredOutputsParams(structural_tag={"type": "structural_tag", "format": format_})


class ToolCallStream:
    """Splits one streamed output into content deltas and whole calls.

    Content streams as it comes, except text that may be the start of a `<tool_call>` tag (held back until it
    is known); a block is held until its `</tool_call>`, then parsed and sent as one call. Whitespace between
    and after calls is dropped. `finish()` releases what is held when the output ends."""

    def __init__(self, parser: type[HermesToolParser]) -> None:
        self.parser = parser
        self._held = ""  # text not yet sent: a possible tag start, or an open block
        self.calls: list[ParsedCall] = []  # every call parsed so far, in order (a call's index is its place here)
        self._num_sent = 0

    def feed(self, delta: str) -> tuple[str, list[ParsedCall]]:
        """(content to send, calls completed) after `delta`."""
        text = self._held + delta
        content: list[str] = []
        while True:
            start = text.find(_START)
            if start < 0:
                keep = _partial_tag_length(text)
                content.append(self._content(text[: len(text) - keep]))
                text = text[len(text) - keep :]
                break
            content.append(self._content(text[:start]))
            end = text.find(_END, start)
            if end < 0:
                text = text[start:]
                break
            call = _parse_block(text[start + len(_START) : end])
            if call is None:
                content.append(text[start : end + len(_END)])
            else:
                self.calls.append(call)
            text = text[end + len(_END) :]
        self._held = text
        return "".join(content), self._new_calls()

    def finish(self) -> tuple[str, list[ParsedCall]]:
        """What is still held when the output ends: an unclosed block that parses is a call, else content."""
        held, self._held = self._held, ""
        call = _parse_block(held[len(_START) :]) if held.startswith(_START) else None
        if call is None:
            return self._content(held), []
        self.calls.append(call)
        return "", self._new_calls()

    def _content(self, text: str) -> str:
        """Text outside blocks; whitespace once a call was made (between and after calls) is dropped."""
        return "" if self.calls and not text.strip() else text

    def _new_calls(self) -> list[ParsedCall]:
        new = self.calls[self._num_sent :]
        self._num_sent = len(self.calls)
        return new


def _partial_tag_length(text: str) -> int:
    """How many characters at the end of `text` could begin `<tool_call>`."""
    for n in range(min(len(text), len(_START) - 1), 0, -1):
        if _START.startswith(text[-n:]):
            return n
    return 0


TOOL_PARSERS: dict[str, type[HermesToolParser]] = {HermesToolParser.name: HermesToolParser}
