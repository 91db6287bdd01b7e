"""GrammarState: where one output stands in its grammar, and which tokens may come next.

It belongs to the output's `Sequence`, on the scheduler's side of the step: the scheduler
is its one writer (it accepts each sampled token) and asks it for the next-token mask of
every constrained output it schedules to sample (`grammar_bitmask`), which travels to the
model runner inside the step's plain-data `SchedulerOutput` — so it works unchanged when
the runner is in another process. A preempted sequence keeps its tokens, and so its state;
an output that forks (a beam) gets a copy (`fork`). `rollback` undoes accepted tokens, for
speculative decoding.

The mask is xgrammar's layout: int32 words, bit t % 32 of word t // 32 set when token t
is allowed.
"""

from __future__ import annotations

from typing import Any

import torch


def bitmask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


class GrammarState:
    def __init__(self, matcher: Any, vocab_size: int) -> None:
        self.matcher = matcher  # an xgrammar.GrammarMatcher
        self.vocab_size = vocab_size

    def accept(self, token: int) -> bool:
        """Advance by `token`; False (and no change) when the grammar does not allow it."""
        return self.matcher.accept_token(token)

    @property
    def terminated(self) -> bool:
        """The grammar is complete and its stop token was accepted: nothing may follow."""
        return self.matcher.is_terminated()

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the tokens allowed next into row `row` of `bitmask`."""
        self.matcher.fill_next_token_bitmask(bitmask, row)

    def rollback(self, num_tokens: int) -> None:
        """Undo the last `num_tokens` accepted tokens."""
        self.matcher.rollback(num_tokens)

    def fork(self) -> GrammarState:
        """An independent copy at the same place (for an output that splits off this one)."""
        return GrammarState(self.matcher.fork(), self.vocab_size)


def grammar_bitmask(states: list[GrammarState]) -> torch.Tensor:
    """The next-token masks of `states`, one row each: [len(states), words] int32."""
    bitmask = torch.full((len(states), bitmask_words(states[0].vocab_size)), -1, dtype=torch.int32)
    for row, state in enumerate(states):
        state.fill(bitmask, row)
    return bitmask
