"""Sequence: one stream of tokens the engine is producing.

Who writes what: the scheduler alone writes a sequence's status, computed count
and tokens (and its `num_tokens_sent`, the part the model runner has been told
of), and advances its grammar state (structured output) by each token; its KV blocks belong to the block manager (`BlockManager.block_table`);
its sampling state (the seeded generator, the penalty history) lives in the
model runner. The engine writes only what it shows: logprob entries and times.
"""

from __future__ import annotations

import enum
import itertools
import time

from kvserve.sampling_params import SamplingParams
from kvserve.structured_output.grammar_state import GrammarState

_seq_counter = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """Token ids plus how many of them already have K/V in the cache.

    Everything from `num_computed_tokens` to `len(token_ids)` still has to go
    through the model (a prompt, a prompt chunk, the last sampled token, or
    everything after a preemption by recompute). A beam (`is_beam`) does not
    sample: its next-token logprobs go to its request's beam search, which
    extends, forks or drops it; until then it is `parked` and needs no compute.
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
        self.seed = params.seed if seed is None else seed
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0
        self.num_tokens_sent = 0  # tokens the model runner knows of (0: it has never seen this sequence)
        self.num_cached_tokens = 0  # prompt tokens served from the prefix cache at first schedule
        self.num_preemptions = 0
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.cumulative_logprob = 0.0
        self.logprobs: list[dict] | None = [] if params.logprobs is not None else None
        # entry j holds the logprobs of prompt token j given tokens < j; the first token has none
        self.prompt_logprobs: list[dict | None] | None = [None] if params.prompt_logprobs is not None else None
        self.bad_words_token_ids: list[list[int]] = []
        self.grammar: GrammarState | None = None  # where the output stands in its structured-output grammar
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
        """A new sequence with the same tokens and output state, unknown to the runner and holding no blocks
        (`Scheduler.fork` shares the parent's)."""
        child = Sequence.__new__(Sequence)
        child.__dict__.update(self.__dict__)
        child.seq_id = next(_seq_counter)
        child.token_ids = list(self.token_ids)
        child.num_tokens_sent = 0
        child.logprobs = None if self.logprobs is None else list(self.logprobs)
        child.prompt_logprobs = None
        child.grammar = None if self.grammar is None else self.grammar.fork()
        child.parked = False
        return child
