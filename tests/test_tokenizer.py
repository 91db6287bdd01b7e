"""Incremental detokenization streams exactly the text a full decode gives, for BPE and SentencePiece."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from conftest import SMOLLM2, STORIES
from kvserve.tokenizer import IncrementalDetokenizer

TEXTS = [
    "Once upon a time, there was a little girl.",
    "  leading spaces and   runs\tof\twhitespace\n\nnew lines",
    "naïve café, Zürich — “quotes” and ellipsis…",
    "中文字符和日本語のテキスト",
    "emoji 🙂🚀👩‍👩‍👧 and flags 🇫🇷",
    "def f(x):\n    return x ** 2  # code\n",
    "numbers 3.14159 2024-11-23 1,000,000",
]


def _stream(tokenizer, ids: list[int], prompt: list[int]) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens=True)
    return [detok.add_tokens([t]) for t in ids]


@pytest.mark.parametrize("model_dir", [STORIES, SMOLLM2], ids=["sentencepiece", "byte-level-bpe"])
@pytest.mark.parametrize("text", TEXTS)
def test_streamed_text_equals_full_decode(model_dir, text):
    if not model_dir.is_dir():
        pytest.skip(f"{model_dir} is absent")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt = tokenizer("Here is some text:").input_ids
    ids = tokenizer(" " + text, add_special_tokens=False).input_ids
    pieces = _stream(tokenizer, ids, prompt)
    full = tokenizer.decode(prompt + ids, skip_special_tokens=True)
    prompt_text = tokenizer.decode(prompt, skip_special_tokens=True)
    assert "".join(pieces) == full[len(prompt_text) :]
    assert all("\ufffd" not in p for p in pieces)


def test_multibyte_character_split_over_tokens_waits_for_completion():
    if not STORIES.is_dir():
        pytest.skip(f"{STORIES} is absent")
    tokenizer = AutoTokenizer.from_pretrained(STORIES)
    ids = tokenizer("🚀", add_special_tokens=False).input_ids
    assert len(ids) > 2  # byte fallback: one token per UTF-8 byte
    pieces = _stream(tokenizer, ids, tokenizer("A").input_ids)
    assert all(p.strip() == "" for p in pieces[:-1])  # a space token, then bytes that wait for the character
    assert pieces[-1] == "🚀"
