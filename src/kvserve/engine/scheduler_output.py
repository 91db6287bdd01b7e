"""SchedulerOutput: what one step runs, as plain data that a worker in another process can take.

It names sequences by id and carries, for each scheduled one, only what the
model runner cannot know yet: everything about a sequence it has never seen
(`NewSequenceData`), or for one it has, the tokens appended and the block ids
changed since it last ran, and how many tokens are computed
(`CachedSequenceData`). The runner keeps the rest (`RunnerSequence`).

Every update is positional ("tokens from index i are ...", "the block table
from index j is ..."), so applying the same output twice leaves the runner as
applying it once. That is what lets the engine re-run parts of a failed step
(`restricted_to`, a probe) to find the request that broke it.

The block-table rule that keeps the diffs small: while a sequence runs, the
blocks before the one holding its first uncomputed token never change
(copy-on-write and new blocks only ever touch that block and later ones); a
sequence coming back from the waiting queue gets its whole table again. The one
change before that block: with a sliding window on every layer, blocks behind
the window are freed (block_manager.py) and their entries become placeholders.
The runner is not told: it keeps the ids it had, which no attention backend uses
(keys outside a layer's window are never weighed), while a sequence new to it
gets the placeholders with the rest of its table.

Outputs constrained by a grammar (structured output) that sample this step
carry their next-token masks (`grammar_seq_ids`, one `grammar_bitmask` row
each), computed here on the scheduler's side, where the grammar state lives.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from kvserve.sampling_params import SamplingParams


@dataclass
class NewSequenceData:
    """Everything about a sequence the runner has not seen before."""

    seq_id: int
    request_id: str
    token_ids: list[int]  # every token so far: the prompt and any output
    num_prompt_tokens: int
    params: SamplingParams
    seed: int | None
    block_ids: list[int]
    num_computed_tokens: int
    is_beam: bool = False
    bad_words_token_ids: list[list[int]] = field(default_factory=list)
    num_prompt_logprobs: int = 0  # prompt positions whose logprobs are already known
    fork_seeds: list[tuple[int, int | None]] = field(default_factory=list)  # (seq_id, seed) of outputs splitting off at its first sample


@dataclass
class CachedSequenceData:
    """What changed for a sequence the runner already holds."""

    seq_id: int
    request_id: str
    num_computed_tokens: int
    token_start: int  # token_ids[token_start:] = new_token_ids
    new_token_ids: list[int]
    block_start: int  # block_table[block_start:] = new_block_ids
    new_block_ids: list[int]


@dataclass
class SchedulerOutput:
    new_seqs: list[NewSequenceData]
    cached_seqs: list[CachedSequenceData]
    num_scheduled_tokens: dict[int, int]  # seq_id -> tokens to compute this step, in schedule order
    finished_seq_ids: list[int] = field(default_factory=list)  # the runner forgets these
    block_copies: list[tuple[int, int]] = field(default_factory=list)  # (src, dst), before the forward
    num_preempted: int = 0
    probe: bool = False  # run, but keep no sample: the runner rewinds the seeded generators
    grammar_seq_ids: list[int] = field(default_factory=list)  # constrained sequences that sample this step
    grammar_bitmask: torch.Tensor | None = None  # [len(grammar_seq_ids), vocab/32] int32: the tokens each may take
    # seq_id -> proposed next tokens (speculative decoding), computed after the sequence's last token in the same
    # step and counted in its num_scheduled_tokens; the runner verifies them (spec_decode/ in the package)
    spec_token_ids: dict[int, list[int]] = field(default_factory=dict)
    # seq_id -> how many tokens the runner's draft model proposes after the sequence's last one (method draft_model):
    # slots for them are allocated and counted in num_scheduled_tokens, the runner drafts and verifies them
    num_draft_tokens: dict[int, int] = field(default_factory=dict)

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(self.num_scheduled_tokens.values())

    def num_spec_tokens(self, seq_id: int) -> int:
        """Proposed tokens a sequence verifies this step, from either proposer."""
        return len(self.spec_token_ids.get(seq_id, ())) + self.num_draft_tokens.get(seq_id, 0)

    def is_empty(self) -> bool:
        return not self.num_scheduled_tokens

    def request_ids(self) -> dict[int, str]:
        """seq_id -> request_id of every scheduled sequence."""
        return {d.seq_id: d.request_id for d in (*self.new_seqs, *self.cached_seqs)}

    def restricted_to(self, seq_ids: set[int]) -> SchedulerOutput:
        """The same step for `seq_ids` only, as a probe: their updates again (harmless: positional), no
        block copies (the failed step made them before anything else), nothing finished."""
        grammar_rows = [i for i, s in enumerate(self.grammar_seq_ids) if s in seq_ids]
        return replace(
            self,
            new_seqs=[d for d in self.new_seqs if d.seq_id in seq_ids],
            cached_seqs=[d for d in self.cached_seqs if d.seq_id in seq_ids],
            num_scheduled_tokens={s: n for s, n in self.num_scheduled_tokens.items() if s in seq_ids},
            finished_seq_ids=[],
            block_copies=[],
            probe=True,
            grammar_seq_ids=[self.grammar_seq_ids[i] for i in grammar_rows],
            grammar_bitmask=self.grammar_bitmask[grammar_rows] if grammar_rows else None,
            spec_token_ids={s: d for s, d in self.spec_token_ids.items() if s in seq_ids},
            num_draft_tokens={s: k for s, k in self.num_draft_tokens.items() if s in seq_ids},
        )
