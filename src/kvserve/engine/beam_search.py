"""BeamSearch: one request's beam search, decided step for step as transformers decides it.

The beams are ordinary sequences in the scheduler. Each engine step that
computes a beam's next position hands its log_softmax row here; once every live
beam has one, `step()` picks the continuations and the engine applies them:
the first continuation of a beam extends it in place, further ones fork it
(sharing all its KV blocks, copy-on-write), and beams with no continuation are
freed at once.

The arithmetic is transformers' `GenerationMixin._beam_search` (v4.50+,
float32, same operation order), so greedy-equivalent settings give the same
beams, token for token. A beam's logprobs stay valid while it waits for its
siblings, even if it is preempted meanwhile: a continuation of a preempted beam
is queued to be recomputed from its tokens.

The rules:

- keep K = max(2, 1 + #EOS ids) * W candidates: the top-K of
  (beam score + token logprob) over all beams and tokens;
- a candidate ending in EOS, or reaching `max_tokens`, is finished. Only the
  top-W candidates of the step may enter the W finished slots, scored
  `sum logprob / (generated tokens incl. EOS) ** length_penalty`;
- the W best unfinished candidates are the next beams;
- the search ends when every candidate is finished, when all W slots are
  finished and `early_stopping is True`, or when the best running beam
  (normalized by the current length, or by `max_tokens` for
  `early_stopping="never"` with a positive length penalty) cannot beat the worst
  finished one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvserve.engine.sequence import Sequence
from kvserve.sampling_params import BeamSearchParams

_NEG = -1.0e9  # transformers' "impossible" score


@dataclass
class BeamHypothesis:
    """A finished beam."""

    token_ids: list[int]  # generated tokens, EOS included
    cumulative_logprob: float
    score: float  # cumulative_logprob / len(token_ids) ** length_penalty
    finish_reason: str  # "stop" (EOS) or "length"


@dataclass
class BeamContinuation:
    parent: int  # index into BeamSearch.beams
    token: int
    score: float  # the new beam's cumulative logprob


class BeamSearch:
    def __init__(self, params: BeamSearchParams, eos_token_ids: set[int], max_new_tokens: int, first_beam: Sequence) -> None:
        self.width = params.beam_width
        self.length_penalty = float(params.length_penalty)
        self.early_stopping = params.early_stopping
        self.max_new_tokens = max_new_tokens
        self.eos = torch.tensor(sorted(eos_token_ids) if not params.ignore_eos else [], dtype=torch.long)
        self.num_candidates = max(2, 1 + len(self.eos)) * self.width
        self.beams: list[Sequence] = [first_beam]
        self.scores = torch.zeros(1, dtype=torch.float32)
        self.pending: dict[int, torch.Tensor] = {}  # beam seq_id -> its next-token log_softmax
        self.finished: list[BeamHypothesis | None] = [None] * self.width
        self.finished_scores = torch.full((self.width,), _NEG, dtype=torch.float32)
        self.finished_flags = torch.zeros(self.width, dtype=torch.bool)
        self.improvable = True  # transformers' is_early_stop_heuristic_unsatisfied
        self.num_generated = 0
        self.done = False

    def receive(self, seq: Sequence, logprobs: torch.Tensor) -> None:
        """Keep a beam's next-token logprobs; the beam needs no compute until the step (it may even be preempted)."""
        self.pending[seq.seq_id] = logprobs

    def ready(self) -> bool:
        return all(b.seq_id in self.pending for b in self.beams)

    def step(self) -> list[BeamContinuation]:
        """Advance the search by one token. Returns the next beams (best first); empty when the search is done.

        The caller must then set `beams` to the sequences that carry these continuations, in this order.
        """
        logprobs = torch.stack([self.pending[b.seq_id].float() for b in self.beams])
        self.pending.clear()
        vocab = logprobs.shape[1]
        accumulated = (logprobs + self.scores[:, None]).reshape(-1)
        top_values, top_index = accumulated.topk(min(self.num_candidates, accumulated.numel()))
        parents = top_index // vocab
        tokens = top_index % vocab
        generated = self.num_generated + 1
        hits = torch.isin(tokens, self.eos) | (generated >= self.max_new_tokens)

        running_values = top_values + hits.to(torch.float32) * _NEG
        next_index = running_values.topk(min(self.width, len(running_values))).indices
        self._update_finished(top_values, parents, tokens, hits, generated)
        self.num_generated = generated
        self._update_improvable(running_values[next_index][0])
        all_full = bool(self.finished_flags.all()) and self.early_stopping is True
        self.done = not self.improvable or all_full or bool(hits.all())
        if self.done:
            return []
        self.scores = running_values[next_index]
        return [BeamContinuation(int(parents[i]), int(tokens[i]), float(running_values[i])) for i in next_index.tolist()]

    def _update_finished(self, top_values: torch.Tensor, parents: torch.Tensor, tokens: torch.Tensor, hits: torch.Tensor, generated: int) -> None:
        eligible = hits & (torch.arange(len(hits)) < self.width)
        scores = top_values / (generated**self.length_penalty)
        full = bool(self.finished_flags.all()) and self.early_stopping is True
        scores = scores + torch.tensor(float(full)) * _NEG
        scores = scores + torch.tensor(float(not self.improvable)) * _NEG
        scores = scores + (~eligible).to(torch.float32) * _NEG
        merged_scores = torch.cat((self.finished_scores, scores))
        merged_flags = torch.cat((self.finished_flags, eligible))
        keep = merged_scores.topk(self.width).indices.tolist()
        entries: list[BeamHypothesis | None] = []
        for i in keep:
            if i < self.width:
                entries.append(self.finished[i])
                continue
            c = i - self.width
            if not eligible[c]:
                entries.append(None)
                continue
            token = int(tokens[c])
            reason = "stop" if bool(torch.isin(tokens[c], self.eos)) else "length"
            output = self.beams[int(parents[c])].output_token_ids + [token]
            entries.append(BeamHypothesis(output, float(top_values[c]), float(scores[c]), reason))
        self.finished = entries
        self.finished_scores = merged_scores[keep]
        self.finished_flags = merged_flags[keep]

    def _update_improvable(self, best_running: torch.Tensor) -> None:
        if self.early_stopping == "never" and self.length_penalty > 0.0:
            best_length = self.max_new_tokens
        else:
            best_length = self.num_generated
        best_possible = best_running / (best_length**self.length_penalty)
        worst_finished = torch.where(self.finished_flags, self.finished_scores.min(), torch.tensor(_NEG))
        self.improvable = self.improvable and bool((best_possible > worst_finished).any())

    def results(self) -> list[BeamHypothesis]:
        """The finished beams, best score first."""
        return [h for h in self.finished if h is not None]
