"""SpeculativeConfig: vLLM's `--speculative-config` JSON, validated.

    --speculative-config '{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4}'

`ngram` (prompt lookup) proposes the tokens that followed the longest earlier occurrence of the sequence's
last n tokens (prompt_lookup_min <= n <= prompt_lookup_max) in its own prompt and output.

    --speculative-config '{"model": "path/to/small-model", "num_speculative_tokens": 3}'

`draft_model` (implied by `model`) runs a smaller model with the target's vocabulary, on the same machine and in
the same step, with its own paged KV cache (spec_decode/draft_runner.py). Speculation is
switched off for steps with more than `max_batch_size` running sequences, where a step is compute-bound and
extra query rows cost as much as they save, and per sequence while its acceptance rate stays under
`min_acceptance_rate` (spec_decode/speculator.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any

from kvserve.validation import check, is_int, is_number

METHODS = ("ngram", "draft_model")


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str = "ngram"
    model: str | None = None  # the draft model (a directory, a .gguf, or a cached hub id), with method draft_model
    quantization: str | None = None  # the draft's weights (auto, none, int8, int4); None: as the target's
    num_speculative_tokens: int = 3  # on 2 Zen 4 cores 3 beat 5 (docs/PERFORMANCE.md): 4 rows stay on the GEMV kernels
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 1
    # no speculation in steps with more running sequences than this: on 2 CPU cores a verification row costs
    # almost a decode step once several sequences share one, and batches of 2-16 ran 0.65-0.77x (docs/PERFORMANCE.md)
    max_batch_size: int = 1
    min_acceptance_rate: float = 0.2  # below it (after a few proposals) a sequence proposes fewer tokens

    def __post_init__(self) -> None:
        check(self.method in METHODS, "speculative_config.method", self.method,
              f"one of {', '.join(METHODS)}")
        check((self.model is not None) == (self.method == "draft_model"), "speculative_config.model", self.model,
              "a model path when method is draft_model, and unset for ngram")
        check(self.quantization in (None, "auto", "none", "int8", "int4"), "speculative_config.quantization",
              self.quantization, "one of auto, none, int8, int4 (unset: the target's)")
        check(is_int(self.num_speculative_tokens) and 1 <= self.num_speculative_tokens <= 32,
              "speculative_config.num_speculative_tokens", self.num_speculative_tokens, "an integer in [1, 32]")
        check(is_int(self.prompt_lookup_min) and self.prompt_lookup_min >= 1, "speculative_config.prompt_lookup_min",
              self.prompt_lookup_min, "an integer >= 1")
        check(is_int(self.prompt_lookup_max) and self.prompt_lookup_min <= self.prompt_lookup_max <= 64,
              "speculative_config.prompt_lookup_max", self.prompt_lookup_max, f"an integer in [{self.prompt_lookup_min}, 64]")
        check(is_int(self.max_batch_size) and self.max_batch_size >= 1, "speculative_config.max_batch_size",
              self.max_batch_size, "an integer >= 1")
        check(is_number(self.min_acceptance_rate) and 0 <= self.min_acceptance_rate <= 1,
              "speculative_config.min_acceptance_rate", self.min_acceptance_rate, "a number in [0, 1]")

    @classmethod
    def parse(cls, value: str | dict[str, Any] | SpeculativeConfig | None) -> SpeculativeConfig | None:
        """From the JSON text of `--speculative-config`, its dict, or an instance (None stays None)."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"speculative_config must be a JSON object, got {value!r} ({exc})") from None
        check(isinstance(value, dict), "speculative_config", value, "a JSON object such as "
              '{"method": "ngram", "num_speculative_tokens": 5}')
        if value.get("model") is not None and "method" not in value:  # vLLM infers the method from the model
            value = {**value, "method": "draft_model"}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"speculative_config: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**value)
