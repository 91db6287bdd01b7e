"""Speculator: which running sequences propose how many tokens this step, and how well each has done.

Owned by the scheduler (the one writer of sequences): before a step it asks how many tokens each decoding
sequence should propose (and, for prompt lookup, which), after the step it records how many were accepted. Adaptive rules:

- no proposals when the step runs more than `max_batch_size` sequences: a big batch is compute-bound, so the
  extra query rows cost about what they save (docs/PERFORMANCE.md measures the crossover);
- each sequence keeps a decayed count of proposed and accepted tokens (decay 0.8 per verified step, so about
  the last five steps matter); below `min_acceptance_rate` it proposes fewer tokens, in proportion, and at
  under half of that it pauses for 2, 4, 8 ... (at most 32) steps before trying one token again;
- never more than the request can still emit (max_tokens) or the context can hold.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import zip_longest

from kvserve.engine.sequence import Sequence
from kvserve.spec_decode.config import SpeculativeConfig
from kvserve.spec_decode.ngram_proposer import propose_ngram

_DECAY = 0.8
_MAX_PAUSE = 32


@dataclass
class _Record:
    proposed: float = 0.0  # decayed counts
    accepted: float = 0.0
    pause: int = 0  # steps left without proposals
    backoff: int = 1  # the next pause's length


@dataclass
class SpecDecodeStats:
    """Since start (vLLM's spec_decode counters)."""

    num_drafts: int = 0  # steps in which a sequence had proposals
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    # drafts whose i-th proposal was accepted (vLLM's spec_decode_num_accepted_tokens_per_pos)
    accepted_per_position: list[int] = field(default_factory=list)

    def __add__(self, other: SpecDecodeStats) -> SpecDecodeStats:
        return self._combined(other, 1)

    def since(self, earlier: SpecDecodeStats) -> SpecDecodeStats:
        """What happened between `earlier` and this reading (both cumulative)."""
        return self._combined(earlier, -1)

    def _combined(self, other: SpecDecodeStats, sign: int) -> SpecDecodeStats:
        per_position = zip_longest(self.accepted_per_position, other.accepted_per_position, fillvalue=0)
        return SpecDecodeStats(self.num_drafts + sign * other.num_drafts, self.num_draft_tokens + sign * other.num_draft_tokens,
                               self.num_accepted_tokens + sign * other.num_accepted_tokens,
                               [a + sign * b for a, b in per_position])

    def copy(self) -> SpecDecodeStats:
        return SpecDecodeStats(self.num_drafts, self.num_draft_tokens, self.num_accepted_tokens, list(self.accepted_per_position))

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens emitted per verified step: the accepted proposals plus the one the target always samples."""
        return 1 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0


class Speculator:
    def __init__(self, config: SpeculativeConfig) -> None:
        self.config = config
        self.records: dict[int, _Record] = {}
        self.stats = SpecDecodeStats()

    def num_proposals(self, seq: Sequence, num_running: int, limit: int) -> int:
        """How many tokens `seq` should propose after its last one this step, at most `limit` (0: none)."""
        config = self.config
        if num_running > config.max_batch_size or limit <= 0 or seq.is_beam:
            return 0
        record = self.records.setdefault(seq.seq_id, _Record())
        if record.pause:
            record.pause -= 1
            return 0
        k = min(config.num_speculative_tokens, limit)
        if record.proposed >= config.num_speculative_tokens:  # judged once it has proposed about one full draft
            rate = record.accepted / record.proposed
            if rate < config.min_acceptance_rate:
                k = max(1, min(k, int(config.num_speculative_tokens * rate / config.min_acceptance_rate)))
        return k

    def propose(self, seq: Sequence, num_running: int, limit: int) -> list[int]:
        """Prompt-lookup proposals for `seq` (method ngram), at most `limit`; a draft model's are made by the
        model runner, in the slots `num_proposals` asks for."""
        k = self.num_proposals(seq, num_running, limit)
        config = self.config
        return propose_ngram(seq.token_ids, k, config.prompt_lookup_min, config.prompt_lookup_max) if k else []

    def record(self, seq: Sequence, num_proposed: int, num_accepted: int) -> None:
        """A verified step of `seq`: `num_accepted` of its `num_proposed` tokens were accepted."""
        stats = self.stats
        stats.num_drafts += 1
        stats.num_draft_tokens += num_proposed
        stats.num_accepted_tokens += num_accepted
        per_position = stats.accepted_per_position
        if len(per_position) < num_accepted:
            per_position.extend([0] * (num_accepted - len(per_position)))
        for i in range(num_accepted):
            per_position[i] += 1
        record = self.records.setdefault(seq.seq_id, _Record())
        record.proposed = record.proposed * _DECAY + num_proposed
        record.accepted = record.accepted * _DECAY + num_accepted
        if record.proposed >= self.config.num_speculative_tokens and record.accepted < 0.5 * self.config.min_acceptance_rate * record.proposed:
            record.pause, record.backoff = record.backoff, min(2 * record.backoff, _MAX_PAUSE)
            record.proposed = record.accepted = 0.0  # judged afresh when it tries again
        elif num_accepted:
            record.backoff = 1

    def forget(self, seq_id: int) -> None:
        self.records.pop(seq_id, None)
