"""SequenceGroup: the sequences of one request, and the rules by which they multiply and end.

A sampling request with `best_of` outputs starts as one sequence that prefills
the prompt; the other outputs split off it when it samples its first token
(each drawing its own first token from the same logits), sharing its KV blocks
copy-on-write. A beam search request starts as one beam; after every step in
which all live beams have their next-token logprobs, the search picks the next
beams: the first continuation of a beam extends it in place, further ones fork
it, and beams with no continuation are dropped.

The group decides; the scheduler applies (it is the one writer of status,
tokens and blocks). The group writes only its own bookkeeping and a beam's
`parked` flag.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvserve.engine.beam_search import BeamSearch
from kvserve.engine.sequence import Sequence


@dataclass
class BeamStep:
    """What one beam-search step decided, for the scheduler to apply.

    `beams` are the next beams in order, each with the token it appends and its new cumulative
    logprob; a beam listed in `forked` is a new sequence to fork from its parent; `dropped`
    beams end. When `done`, every live beam ends and `results` hold the finished beams.
    """

    beams: list[tuple[Sequence, int, float]] = field(default_factory=list)
    forked: dict[int, Sequence] = field(default_factory=dict)  # new beam seq_id -> the beam it forks
    dropped: list[Sequence] = field(default_factory=list)
    done: bool = False


class SequenceGroup:
    def __init__(self, request_id: str, first: Sequence, to_fork: list[Sequence] | None = None, beam: BeamSearch | None = None) -> None:
        self.request_id = request_id
        self.first = first
        self.to_fork = list(to_fork or [])  # outputs that split off `first` at its first sample
        self.beam = beam
        self._beam_started = False

    def fan_out(self, seq: Sequence) -> int:
        """How many running sequences `seq` becomes: the scheduler admits a request only if all fit."""
        if seq is not self.first:
            return 1
        if self.beam is not None:
            return 1 if self._beam_started else self.beam.width
        return 1 + len(self.to_fork)

    def take_forks(self, seq: Sequence) -> list[Sequence]:
        """The outputs that split off `seq` now that it sampled its first token (none after that)."""
        if seq is not self.first or not self.to_fork:
            return []
        forks, self.to_fork = self.to_fork, []
        return forks

    # ---- beam search ------------------------------------------------------------------

    def receive_beam_logprobs(self, seq: Sequence, logprobs: torch.Tensor) -> BeamStep | None:
        """Hand a beam its next-token logprobs; once every live beam has them, the step to apply."""
        assert self.beam is not None
        self.beam.receive(seq, logprobs)
        seq.parked = True
        if not self.beam.ready():
            return None
        self._beam_started = True
        parents = self.beam.beams
        continuations = self.beam.step()
        if self.beam.done:
            return BeamStep(dropped=list(parents), done=True)
        step = BeamStep()
        kept = {c.parent for c in continuations}
        step.dropped = [seq for i, seq in enumerate(parents) if i not in kept]
        extended: set[int] = set()
        for c in continuations:
            parent = parents[c.parent]
            if c.parent in extended:
                child = parent.fork()
                step.forked[child.seq_id] = parent
                step.beams.append((child, c.token, c.score))
            else:
                extended.add(c.parent)
                step.beams.append((parent, c.token, c.score))
        for beam, _, _ in step.beams:
            beam.parked = False
        self.beam.beams = [beam for beam, _, _ in step.beams]
        return step
