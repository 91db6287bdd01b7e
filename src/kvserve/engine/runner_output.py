"""ModelRunnerOutput: what a step produced, keyed by sequence id (the answer to a SchedulerOutput)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class PromptLogprobs:
    """Logprobs of some consecutive prompt tokens of one sequence (one row per token)."""

    token_ids: list[int]
    logprobs: list[float]
    ranks: list[int]
    top_ids: list[list[int]]
    top_logprobs: list[list[float]]


@dataclass
class ModelRunnerOutput:
    """Sampled tokens (outputs that split off this step included), their logprobs in the raw model
    distribution, the top logprobs asked for, beams' next-token log_softmax rows, and prompt logprobs.

    A sequence gets one token per step, or with speculative decoding its accepted proposals and then one
    sampled token: every per-token entry is a list, in token order."""

    sampled: dict[int, list[int]] = field(default_factory=dict)  # seq_id -> its new tokens
    logprobs: dict[int, list[float]] = field(default_factory=dict)  # seq_id -> the logprob of each
    # seq_id -> for each new token, (top ids, their logprobs, rank of the token) or None when not asked for
    top_logprobs: dict[int, list[tuple[list[int], list[float], int] | None]] = field(default_factory=dict)
    beam_logprobs: dict[int, torch.Tensor] = field(default_factory=dict)  # beam seq_id -> [vocab] log_softmax
    prompt_logprobs: dict[int, PromptLogprobs] = field(default_factory=dict)  # seq_id -> new prompt positions
