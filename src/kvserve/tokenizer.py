"""Tokenizer loading and incremental detokenization for streaming.

Decoding one token at a time is wrong for byte-level BPE (a character's UTF-8
bytes can be split over tokens) and for SentencePiece (a leading "▁" becomes a
space only when something precedes it). `IncrementalDetokenizer` therefore
decodes a short sliding window of ids twice — with and without the newest
tokens — and emits the difference, holding text back while it ends in an
incomplete character.
"""

from __future__ import annotations

import os
from typing import Any

_INCOMPLETE = "\ufffd"
_CONTEXT_TOKENS = 5


def load_tokenizer(path: str, revision: str | None = None) -> Any:
    """A Hugging Face tokenizer for a model directory, hub id or .gguf file."""
    if path.endswith(".gguf"):
        from kvserve.models.gguf_loader import load_gguf_tokenizer

        return load_gguf_tokenizer(path)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, revision=revision)
    except Exception as exc:
        raise ValueError(f"cannot load a tokenizer from {path}: {exc}") from exc


def load_chat_template(value: str) -> str:
    """vLLM's `--chat-template FILE|STRING`: the text of the file `value` names, else `value` itself when it reads
    as a template (it holds `{`, `}` or a newline); a ValueError for a missing file or a template that does not
    parse, before any request needs it."""
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            template = f.read()
    elif any(c in value for c in "{}\n"):
        template = value
    else:
        raise ValueError(f"chat_template {value!r} is neither a file nor a template (a template holds {{{{ ... }}}} "
                         "or {% ... %})")
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:  # the environment transformers renders templates in
        ImmutableSandboxedEnvironment(extensions=[loopcontrols]).parse(template)
    except jinja2.TemplateSyntaxError as exc:
        raise ValueError(f"chat_template does not parse as a Jinja template: {exc.message} (line {exc.lineno})") from None
    return template


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas."""

    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens, clean_up_tokenization_spaces=False)

    def add_tokens(self, new_ids: list[int]) -> str:
        """Append `new_ids`; return the text they complete (may be empty)."""
        self.ids.extend(new_ids)
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full_text = self._decode(self.ids[self.prefix_offset :])
        if len(full_text) <= len(prefix_text) or full_text.endswith(_INCOMPLETE):
            return ""
        delta = full_text[len(prefix_text) :]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        if self.prefix_offset > _CONTEXT_TOKENS:
            drop = self.prefix_offset - _CONTEXT_TOKENS
            del self.ids[:drop]
            self.prefix_offset -= drop
            self.read_offset -= drop
        self.text += delta
        return delta
