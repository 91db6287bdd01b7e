"""RequestOutput and CompletionOutput: what the engine hands back, shaped like vLLM's."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    """One token's log-probability, its rank in the distribution and its text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# For each generated position: {token_id: Logprob} holding the sampled token and the top-k.
SampleLogprobs = list[dict[int, Logprob]]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: SampleLogprobs | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error" | None while running
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """The state of one request after a step.

    `outputs[i].text` and `.token_ids` are cumulative; `new_text` / `new_token_ids`
    on each completion hold only what this step added (used for streaming).
    `error` is set (and every output's finish_reason is "error") when the request
    failed inside an engine step; the engine ended it alone and kept serving.
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    new_text: list[str] = field(default_factory=list)
    new_token_ids: list[list[int]] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None


@dataclass
class BeamSearchSequence:
    """One beam of `LLM.beam_search`, as vLLM returns it: `tokens` and `text` include the prompt."""

    tokens: list[int]
    text: str
    cum_logprob: float
    score: float  # cum_logprob / (generated tokens, EOS included) ** length_penalty
    finish_reason: str | None = None  # "stop" (EOS) or "length"
    num_prompt_tokens: int = 0

    @property
    def output_token_ids(self) -> list[int]:
        return self.tokens[self.num_prompt_tokens :]


@dataclass
class BeamSearchOutput:
    """The beams of one prompt, best score first."""

    sequences: list[BeamSearchSequence]
