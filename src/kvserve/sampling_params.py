"""SamplingParams and BeamSearchParams: how to pick tokens and when to stop, validated at construction."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

_GREEDY_EPS = 1e-5
_MAX_LOGPROBS = 20
_SEED_MASK = (1 << 63) - 1


def _fail(name: str, value: object, allowed: str) -> None:
    raise ValueError(f"{name} must be {allowed}, got {value!r}")


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
    stop_list: list[str] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.n, int) or isinstance(self.n, bool) or self.n < 1:
            _fail("n", self.n, "an integer >= 1")
        if self.best_of is None:
            self.best_of = self.n
        elif not _is_int(self.best_of) or self.best_of < self.n:
            _fail("best_of", self.best_of, f"an integer >= n ({self.n}) or None")
        if not _is_number(self.temperature) or self.temperature < 0:
            _fail("temperature", self.temperature, "a number >= 0")
        if not _is_number(self.top_p) or not (0 < self.top_p <= 1):
            _fail("top_p", self.top_p, "a number in (0, 1]")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < -1:
            _fail("top_k", self.top_k, "an integer >= 1, or 0 / -1 to disable")
        if self.top_k == -1:
            self.top_k = 0
        if not _is_number(self.min_p) or not (0 <= self.min_p <= 1):
            _fail("min_p", self.min_p, "a number in [0, 1]")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            _fail("seed", self.seed, "an integer or None")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1):
            _fail("max_tokens", self.max_tokens, "an integer >= 1 or None")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            _fail("min_tokens", self.min_tokens, "an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            _fail("min_tokens", self.min_tokens, f"<= max_tokens ({self.max_tokens})")
        if self.stop is None:
            self.stop_list = []
        elif isinstance(self.stop, str):
            self.stop_list = [self.stop]
        elif isinstance(self.stop, (list, tuple)) and all(isinstance(s, str) for s in self.stop):
            self.stop_list = list(self.stop)
        else:
            _fail("stop", self.stop, "a string or a list of strings")
        if any(s == "" for s in self.stop_list):
            _fail("stop", self.stop, "non-empty strings")
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        elif not isinstance(self.stop_token_ids, (list, tuple)) or not all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids):
            _fail("stop_token_ids", self.stop_token_ids, "a list of non-negative integers")
        self.stop_token_ids = list(self.stop_token_ids)
        if not _is_number(self.presence_penalty) or not (-2 <= self.presence_penalty <= 2):
            _fail("presence_penalty", self.presence_penalty, "a number in [-2, 2]")
        if not _is_number(self.frequency_penalty) or not (-2 <= self.frequency_penalty <= 2):
            _fail("frequency_penalty", self.frequency_penalty, "a number in [-2, 2]")
        if not _is_number(self.repetition_penalty) or not (0 < self.repetition_penalty <= 2):
            _fail("repetition_penalty", self.repetition_penalty, "a number in (0, 2]")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or not (0 <= value <= _MAX_LOGPROBS)):
                _fail(name, value, f"an integer in [0, {_MAX_LOGPROBS}] or None")
        self._check_logits_processing()

    def _check_logits_processing(self) -> None:
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                _fail("logit_bias", self.logit_bias, "a dict {token_id: bias}")
            bias: dict[int, float] = {}
            for key, value in self.logit_bias.items():
                token = int(key) if isinstance(key, str) and key.isdigit() else key
                if not _is_int(token) or token < 0:
                    _fail("logit_bias", self.logit_bias, "a dict with non-negative integer token ids as keys")
                if not _is_number(value) or not (-100 <= value <= 100):
                    _fail("logit_bias", self.logit_bias, "a dict with bias values in [-100, 100]")
                bias[token] = float(value)
            self.logit_bias = bias or None
        if self.allowed_token_ids is not None:
            ids = self.allowed_token_ids
            if not isinstance(ids, (list, tuple)) or not ids or not all(_is_int(t) and t >= 0 for t in ids):
                _fail("allowed_token_ids", ids, "a non-empty list of non-negative integers or None")
            self.allowed_token_ids = list(ids)
        if self.bad_words is not None:
            words = self.bad_words
            if not isinstance(words, (list, tuple)) or not all(isinstance(w, str) and w.strip() for w in words):
                _fail("bad_words", words, "a list of non-empty strings or None")
            self.bad_words = list(words) or None

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
        if not _is_int(self.beam_width) or self.beam_width < 1:
            _fail("beam_width", self.beam_width, "an integer >= 1")
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            _fail("max_tokens", self.max_tokens, "an integer >= 1")
        if not isinstance(self.ignore_eos, bool):
            _fail("ignore_eos", self.ignore_eos, "True or False")
        if not _is_number(self.length_penalty) or not math.isfinite(self.length_penalty):
            _fail("length_penalty", self.length_penalty, "a finite number")
        if self.early_stopping not in (True, False, "never") or not isinstance(self.early_stopping, (bool, str)):
            _fail("early_stopping", self.early_stopping, 'True, False or "never"')


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)
