"""SamplingParams: how to pick tokens and when to stop, validated at construction."""

from __future__ import annotations

from dataclasses import dataclass, field

_GREEDY_EPS = 1e-5


def _fail(name: str, value: object, allowed: str) -> None:
    raise ValueError(f"{name} must be {allowed}, got {value!r}")


@dataclass
class SamplingParams:
    """Per-request sampling settings, named and defaulted as in vLLM.

    `temperature=0` means greedy. `top_k=0` (or -1) and `top_p=1` disable those
    filters. `seed` makes the request's random draws depend only on the seed and
    the request's own tokens, never on what else shares the batch.
    """

    n: int = 1
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
    stop_list: list[str] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.n, int) or isinstance(self.n, bool) or self.n < 1:
            _fail("n", self.n, "an integer >= 1")
        if self.n != 1:
            _fail("n", self.n, "1 (parallel sampling is not supported yet)")
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
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or not (0 <= value <= 20)):
                _fail(name, value, "an integer in [0, 20] or None")

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    @property
    def needs_penalties(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1.0


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)
