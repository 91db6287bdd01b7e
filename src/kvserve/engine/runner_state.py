"""What the model runner remembers of each sequence between steps, kept current from SchedulerOutputs.

The scheduler sends a sequence's tokens, block ids and parameters once, then
only what changed; the runner keeps the rest here, with the state only the
runner needs: the seeded generator (so a sequence draws the same numbers
whatever shares its batch, and across preemptions), how many prompt positions
have their logprobs, and the outputs still to split off it. Updates are
positional, so applying an output twice equals applying it once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvserve.engine.scheduler_output import SchedulerOutput
from kvserve.sampling_params import SamplingParams


def seeded_generator(seed: int | None) -> torch.Generator | None:
    if seed is None:
        return None
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


@dataclass
class RunnerSequence:
    seq_id: int
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    generator: torch.Generator | None
    block_table: list[int]
    num_computed_tokens: int
    is_beam: bool = False
    bad_words_token_ids: list[list[int]] = field(default_factory=list)
    num_prompt_logprobs: int = 0  # prompt positions whose logprobs were reported
    fork_seeds: list[tuple[int, int | None]] = field(default_factory=list)  # outputs to split off at its first sample
    num_draft_computed: int = 0  # with a draft model: the leading tokens whose draft KV its current blocks hold

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def needs_prompt_logprobs(self) -> bool:
        return self.params.prompt_logprobs is not None and self.num_prompt_logprobs < self.num_prompt_tokens


class RunnerState:
    """The runner's sequences by id, and the generators of outputs sampled before they arrive as sequences."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.seqs: dict[int, RunnerSequence] = {}
        self.fork_generators: dict[int, torch.Generator | None] = {}  # an output that split off, until it is scheduled

    def apply(self, output: SchedulerOutput) -> None:
        for seq_id in output.finished_seq_ids:
            self.seqs.pop(seq_id, None)
            self.fork_generators.pop(seq_id, None)
        for new in output.new_seqs:
            known = self.seqs.get(new.seq_id)
            if known is not None:  # the same output again (a probe): keep the sampling state
                generator = known.generator
            elif new.seq_id in self.fork_generators:
                generator = self.fork_generators.pop(new.seq_id)
            else:
                generator = seeded_generator(new.seed)
            self.seqs[new.seq_id] = RunnerSequence(
                new.seq_id, list(new.token_ids), new.num_prompt_tokens, new.params, generator, list(new.block_ids),
                new.num_computed_tokens, new.is_beam, new.bad_words_token_ids,
                known.num_prompt_logprobs if known is not None else new.num_prompt_logprobs,
                known.fork_seeds if known is not None else list(new.fork_seeds),
                known.num_draft_computed if known is not None else 0,  # (never trusts another sequence's draft KV)
            )
        for diff in output.cached_seqs:
            seq = self.seqs[diff.seq_id]
            if seq.num_draft_computed:  # blocks replaced (a preempted sequence resumed elsewhere) lose the draft's KV
                table = seq.block_table
                changed = next((j for j, b in enumerate(diff.new_block_ids, diff.block_start) if j < len(table) and table[j] != b), None)
                limit = diff.num_computed_tokens if changed is None else min(diff.num_computed_tokens, changed * self.block_size)
                seq.num_draft_computed = min(seq.num_draft_computed, limit)
            seq.num_computed_tokens = diff.num_computed_tokens
            seq.token_ids[diff.token_start :] = diff.new_token_ids
            seq.block_table[diff.block_start :] = diff.new_block_ids
