"""SamplingParams and BeamSearchParams: how to pick tokens and when to stop, validated at construction."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from kvserve.validation import check, fail, is_int, is_number, utf8_error

_GREEDY_EPS = 1e-5
_MAX_LOGPROBS = 20
_SEED_MASK = (1 << 63) - 1
# Per-step work grows with these (stop strings are searched and bad words matched every step), so a
# request may not make one step slow for everyone sharing it.
MAX_STOP_STRINGS = 64
MAX_STOP_CHARS = 1024
MAX_TOKEN_ID_LIST = 1024
MAX_BAD_WORDS = 128
MAX_CHOICES = 1024
_CONSTRAINTS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


@dataclass
class StructuredOutputsParams:
    """A constraint on the text a request may generate, shaped and named like vLLM's `StructuredOutputsParams`:
    exactly one of `json` (a JSON schema, as a dict, a JSON string or a pydantic model class), `regex`, `choice`
    (the output is one of these strings), `grammar` (EBNF, GBNF-style as xgrammar reads it), `json_object=True`
    (any JSON object) or `structural_tag` (xgrammar's structural-tag JSON).

    The engine compiles it with xgrammar (structured_output/compiler.py) when the request is added; a schema,
    regex or grammar that does not compile is refused there with a ValueError naming `structured_outputs`.
    `disable_any_whitespace` makes JSON compact (no optional whitespace, which small models can repeat
    forever); `disable_additional_properties` forbids properties a schema does not list even where it does not
    say `additionalProperties: false`.
    """

    json: str | dict | Any | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: str | dict | None = None
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False

    def __post_init__(self) -> None:
        given = [name for name in _CONSTRAINTS if getattr(self, name) is not None]
        check(len(given) == 1, "structured_outputs", {n: getattr(self, n) for n in given},
              f"exactly one of {', '.join(_CONSTRAINTS)}")
        if isinstance(self.json, type) and hasattr(self.json, "model_json_schema"):  # a pydantic model class
            self.json = self.json.model_json_schema()
        if isinstance(self.json, str):
            try:
                self.json = json.loads(self.json)
            except ValueError as exc:
                fail("structured_outputs", self.json, f"a JSON schema; json is not JSON ({exc})")
        check(self.json is None or isinstance(self.json, (dict, bool)), "structured_outputs", self.json,
              "a JSON schema (an object) in json")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            check(value is None or (isinstance(value, str) and value and utf8_error(value) is None), "structured_outputs",
                  value, f"a non-empty string of valid Unicode text in {name}")
        if self.choice is not None:
            choices = self.choice
            check(isinstance(choices, (list, tuple)) and 0 < len(choices) <= MAX_CHOICES
                  and all(isinstance(c, str) and c and utf8_error(c) is None for c in choices),
                  "structured_outputs", choices, f"a list of 1 to {MAX_CHOICES} non-empty strings in choice")
            self.choice = list(choices)
        check(self.json_object in (None, True), "structured_outputs", self.json_object, "true (or unset) in json_object")
        if isinstance(self.structural_tag, str):
            try:
                self.structural_tag = json.loads(self.structural_tag)
            except ValueError as exc:
                fail("structured_outputs", self.structural_tag, f"a structural tag; structural_tag is not JSON ({exc})")
        check(self.structural_tag is None or isinstance(self.structural_tag, dict), "structured_outputs",
              self.structural_tag, "a JSON object in structural_tag")
        for name in ("disable_any_whitespace", "disable_additional_properties"):
            check(isinstance(getattr(self, name), bool), "structured_outputs", getattr(self, name), f"true or false in {name}")

    @property
    def kind(self) -> str:
        """Which constraint this is: json, regex, choice, grammar, json_object or structural_tag."""
        return next(name for name in _CONSTRAINTS if getattr(self, name) is not None)

    def key(self) -> str:
        """The constraint as one canonical string: equal keys compile to the same grammar (the compile cache's key)."""
        return json.dumps([self.kind, getattr(self, self.kind), self.disable_any_whitespace, self.disable_additional_properties],
                          sort_keys=True, ensure_ascii=False)


@dataclass
class SamplingParams:
    """Per-request sampling settings, named and defaulted as in vLLM.

    `temperature=0` means greedy. `top_k=0` (or -1) and `top_p=1` disable those
    filters. `seed` makes the request's random draws depend only on the seed and
    the request's own tokens, never on what else shares the batch.

    `n` outputs are returned; `best_of` (>= n, default n) are generated from one
    shared prompt prefill and the n with the highest cumulative logprob are kept.
    With a seed, output i draws from a generator seeded with `seed + i` (see
    `seed_for_output`): output 0 of `n=4, seed=7` is exactly the output of
    `n=1, seed=7`, output 2 that of `n=1, seed=9`.

    `logit_bias` adds a number in [-100, 100] to a token's logit (OpenAI);
    `allowed_token_ids` keeps only those tokens; `bad_words` forbids the last
    token of a word whenever the output so far ends with the word's other tokens.

    `structured_outputs` constrains every output to a JSON schema, regex, choice or
    grammar (`StructuredOutputsParams`); each of the n outputs follows it on its own,
    and the grammar may end an output (finish_reason "stop") before min_tokens.
    """

    n: int = 1
    best_of: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    structured_outputs: StructuredOutputsParams | None = None
    stop_list: list[str] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        check(is_int(self.n) and self.n >= 1, "n", self.n, "an integer >= 1")
        if self.best_of is None:
            self.best_of = self.n
        else:
            check(is_int(self.best_of) and self.best_of >= self.n, "best_of", self.best_of, f"an integer >= n ({self.n}) or None")
        check(is_number(self.temperature) and self.temperature >= 0, "temperature", self.temperature, "a number >= 0 and finite")
        check(is_number(self.top_p) and 0 < self.top_p <= 1, "top_p", self.top_p, "a number in (0, 1]")
        check(is_int(self.top_k) and self.top_k >= -1, "top_k", self.top_k, "an integer >= 1 (at most the vocabulary size), or 0 / -1 to disable")
        if self.top_k == -1:
            self.top_k = 0
        check(is_number(self.min_p) and 0 <= self.min_p <= 1, "min_p", self.min_p, "a number in [0, 1]")
        check(self.seed is None or is_int(self.seed), "seed", self.seed, "an integer in [-2**63, 2**63) or None")
        check(self.max_tokens is None or (is_int(self.max_tokens) and self.max_tokens >= 1), "max_tokens", self.max_tokens,
              "an integer >= 1 and < 2**63, or None")
        check(is_int(self.min_tokens) and self.min_tokens >= 0, "min_tokens", self.min_tokens, "an integer >= 0 and < 2**63")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            fail("min_tokens", self.min_tokens, f"<= max_tokens ({self.max_tokens})")
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            check(isinstance(getattr(self, name), bool), name, getattr(self, name), "true or false")
        self._check_stop()
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            check(is_number(value) and -2 <= value <= 2, name, value, "a number in [-2, 2]")
        check(is_number(self.repetition_penalty) and 0 < self.repetition_penalty <= 2, "repetition_penalty",
              self.repetition_penalty, "a number in (0, 2]")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            check(value is None or (is_int(value) and 0 <= value <= _MAX_LOGPROBS), name, value, f"an integer in [0, {_MAX_LOGPROBS}] or None")
        self._check_logits_processing()

    def _check_stop(self) -> None:
        if self.stop is None:
            self.stop_list = []
        elif isinstance(self.stop, str):
            self.stop_list = [self.stop]
        elif isinstance(self.stop, (list, tuple)) and all(isinstance(s, str) for s in self.stop):
            self.stop_list = list(self.stop)
        else:
            fail("stop", self.stop, "a string or a list of strings")
        check(len(self.stop_list) <= MAX_STOP_STRINGS, "stop", self.stop, f"at most {MAX_STOP_STRINGS} strings")
        for s in self.stop_list:
            check(0 < len(s) <= MAX_STOP_CHARS, "stop", self.stop, f"non-empty strings of at most {MAX_STOP_CHARS} characters")
            error = utf8_error(s)
            check(error is None, "stop", self.stop, f"valid Unicode text ({error})")
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        ids = self.stop_token_ids
        check(isinstance(ids, (list, tuple)) and len(ids) <= MAX_TOKEN_ID_LIST and all(is_int(t) and t >= 0 for t in ids),
              "stop_token_ids", ids, f"a list of at most {MAX_TOKEN_ID_LIST} non-negative integers")
        self.stop_token_ids = list(ids)

    def _check_logits_processing(self) -> None:
        if self.logit_bias is not None:
            check(isinstance(self.logit_bias, dict), "logit_bias", self.logit_bias, "a dict {token_id: bias}")
            bias: dict[int, float] = {}
            for key, value in self.logit_bias.items():
                token = int(key) if isinstance(key, str) and key.isascii() and key.isdigit() and len(key) <= 19 else key
                check(is_int(token) and token >= 0, "logit_bias", self.logit_bias, "a dict with non-negative integer token ids as keys")
                check(is_number(value) and -100 <= value <= 100, "logit_bias", self.logit_bias, "a dict with bias values in [-100, 100]")
                bias[token] = float(value)
            self.logit_bias = bias or None
        if self.allowed_token_ids is not None:
            ids = self.allowed_token_ids
            check(isinstance(ids, (list, tuple)) and bool(ids) and all(is_int(t) and t >= 0 for t in ids),
                  "allowed_token_ids", ids, "a non-empty list of non-negative integers or None")
            self.allowed_token_ids = sorted(set(ids))
        if self.bad_words is not None:
            words = self.bad_words
            check(isinstance(words, (list, tuple)) and len(words) <= MAX_BAD_WORDS
                  and all(isinstance(w, str) and w.strip() and utf8_error(w) is None for w in words),
                  "bad_words", words, f"a list of at most {MAX_BAD_WORDS} non-empty strings of valid Unicode text, or None")
            self.bad_words = list(words) or None
        if isinstance(self.structured_outputs, dict):
            unknown = sorted(set(self.structured_outputs) - set(StructuredOutputsParams.__dataclass_fields__))
            check(not unknown, "structured_outputs", self.structured_outputs, f"a dict of StructuredOutputsParams fields, not {unknown}")
            self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
        check(self.structured_outputs is None or isinstance(self.structured_outputs, StructuredOutputsParams),
              "structured_outputs", self.structured_outputs, "a StructuredOutputsParams (or a dict of its fields) or None")

    def seed_for_output(self, index: int) -> int | None:
        """The seed of output `index` of this request: `seed + index` (in 63 bits), or None when unseeded."""
        if self.seed is None or index == 0:
            return self.seed
        return (self.seed + index) & _SEED_MASK

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    @property
    def needs_penalties(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1.0

    @property
    def needs_token_masks(self) -> bool:
        return self.logit_bias is not None or self.allowed_token_ids is not None


@dataclass
class BeamSearchParams:
    """Beam search settings, shaped like vLLM's `BeamSearchParams`.

    The search is deterministic and follows transformers' beam search step for
    step: `LLM.beam_search(prompts, BeamSearchParams(W, T, length_penalty=lp,
    early_stopping=es))` returns the same beams, in the same order, as
    `generate(num_beams=W, num_return_sequences=W, do_sample=False,
    max_new_tokens=T, length_penalty=lp, early_stopping=es)`.
    A finished beam's score is its summed logprob divided by
    (number of generated tokens, EOS included) ** length_penalty. With
    `ignore_eos` EOS is an ordinary token and every beam runs to `max_tokens`
    (transformers with no eos_token_id). See docs/SHARING.md.
    """

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    length_penalty: float = 1.0
    early_stopping: bool | str = False

    def __post_init__(self) -> None:
        check(is_int(self.beam_width) and self.beam_width >= 1, "beam_width", self.beam_width, "an integer >= 1")
        check(is_int(self.max_tokens) and self.max_tokens >= 1, "max_tokens", self.max_tokens, "an integer >= 1 and < 2**63")
        check(isinstance(self.ignore_eos, bool), "ignore_eos", self.ignore_eos, "True or False")
        check(is_number(self.length_penalty), "length_penalty", self.length_penalty, "a finite number")
        check(isinstance(self.early_stopping, (bool, str)) and self.early_stopping in (True, False, "never"),
              "early_stopping", self.early_stopping, 'True, False or "never"')

