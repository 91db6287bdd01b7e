"""Sequence: one stream of tokens the engine is producing, and its KV bookkeeping."""

from __future__ import annotations

import enum
import itertools
import time

import torch

from kvserve.sampling_params import SamplingParams

_seq_counter = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """Token ids plus how many of them already have K/V in the cache.

    The scheduler advances `num_computed_tokens`; everything from there to
    `len(token_ids)` still has to go through the model (a prompt, a prompt chunk,
    the last sampled token, or everything after a preemption by recompute).

    Sequences of one request share KV blocks: `children_to_fork` are the other
    outputs of an n>1 request, which split off this sequence when it samples its
    first token (each drawing its own first token from the same logits);
    `fan_out` is how many running sequences this one will become, so the
    scheduler admits the whole group at once. A beam (`is_beam`) does not sample:
    its next-token logprobs go to the request's beam search, which extends,
    forks or drops it; until then it is `parked` and needs no compute.
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        prompt: str | None = None,
        seed: int | None = None,
    ) -> None:
        self.seq_id = next(_seq_counter)
        self.request_id = request_id
        self.prompt = prompt
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []  # chain hashes of this sequence's full blocks, in order
        self.num_cached_tokens = 0  # prompt tokens served from the prefix cache at first schedule
        self.num_preemptions = 0
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.generator: torch.Generator | None = None
        seed = params.seed if seed is None else seed
        if seed is not None:
            self.generator = torch.Generator()
            self.generator.manual_seed(seed)
        self.cumulative_logprob = 0.0
        self.logprobs: list[dict] | None = [] if params.logprobs is not None else None
        # entry j holds the logprobs of prompt token j given tokens < j; the first token has none
        self.prompt_logprobs: list[dict | None] | None = [None] if params.prompt_logprobs is not None else None
        self.bad_words_token_ids: list[list[int]] = []
        self.children_to_fork: list[Sequence] = []
        self.fan_out = 1
        self.is_beam = False
        self.parked = False  # a beam whose next-token logprobs wait for its siblings'
        self.arrival_time = time.monotonic()
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    @property
    def needs_prompt_logprobs(self) -> bool:
        """True until every prompt position has its logprobs (those positions must be computed, not cached)."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < self.num_prompt_tokens

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    def fork(self) -> Sequence:
        """A new sequence with the same tokens and sampling state but no blocks (`BlockManager.fork` shares them)."""
        child = Sequence.__new__(Sequence)
        child.__dict__.update(self.__dict__)
        child.seq_id = next(_seq_counter)
        child.token_ids = list(self.token_ids)
        child.block_table = []
        child.block_hashes = list(self.block_hashes)
        child.generator = None
        child.logprobs = None if self.logprobs is None else list(self.logprobs)
        child.prompt_logprobs = None
        child.children_to_fork = []
        child.fan_out = 1
        child.parked = False
        return child
