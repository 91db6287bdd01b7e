"""Request: the sequences of one user request and what has been shown of them.

A sampling request has `best_of` outputs, each a sequence with its own
detokenizer; they stream together (one RequestOutput per step with all of
them) when `best_of == n`. With `best_of > n` the choice of the n best
(highest cumulative logprob) is only known at the end, so the request is
reported once, when all its sequences are finished. A beam search request is
reported once too, with its finished beams best first.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvserve.engine.beam_search import BeamSearch
from kvserve.engine.sequence import Sequence
from kvserve.outputs import CompletionOutput, RequestOutput
from kvserve.tokenizer import IncrementalDetokenizer


@dataclass
class OutputState:
    """One output sequence: its visible text (stop strings cut) and how much of it was already streamed."""

    seq: Sequence
    detokenizer: IncrementalDetokenizer | None  # None when the engine loaded no tokenizer (skip_tokenizer_init)
    text: str = ""
    emitted_chars: int = 0
    emitted_tokens: int = 0

    def delta(self) -> tuple[str, list[int]]:
        """Text and token ids that are new since the last call (text that might become a stop string is held back)."""
        seq = self.seq
        holdback = 0 if seq.is_finished else max((len(s) for s in seq.params.stop_list), default=1) - 1
        visible = max(len(self.text) - holdback, self.emitted_chars)
        new_text = self.text[self.emitted_chars : visible]
        self.emitted_chars = visible
        output_ids = seq.output_token_ids
        new_ids = output_ids[self.emitted_tokens :]
        self.emitted_tokens = len(output_ids)
        return new_text, new_ids


@dataclass
class Request:
    request_id: str
    prompt_seq: Sequence
    num_returned: int  # n, or the beam width
    outputs: list[OutputState] = field(default_factory=list)  # sampling: best_of outputs in seed order
    beam: BeamSearch | None = None
    beam_texts: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._by_seq = {o.seq.seq_id: o for o in self.outputs}

    def output_of(self, seq: Sequence) -> OutputState:
        return self._by_seq[seq.seq_id]

    @property
    def finished(self) -> bool:
        if self.beam is not None:
            return self.beam.done
        return all(o.seq.is_finished for o in self.outputs)

    @property
    def streams(self) -> bool:
        """Whether partial results may be reported before the request finishes."""
        return self.beam is None and len(self.outputs) == self.num_returned

    def make_output(self) -> RequestOutput:
        seq = self.prompt_seq
        completions, new_text, new_ids = self._completions()
        metrics = {"arrival_time": seq.arrival_time}
        if seq.first_token_time is not None:
            metrics["first_token_time"] = seq.first_token_time
        return RequestOutput(
            request_id=self.request_id,
            prompt=seq.prompt,
            prompt_token_ids=seq.token_ids[: seq.num_prompt_tokens],
            outputs=completions,
            finished=self.finished,
            num_cached_tokens=seq.num_cached_tokens,
            prompt_logprobs=seq.prompt_logprobs,
            new_text=new_text,
            new_token_ids=new_ids,
            metrics=metrics,
        )

    def _completions(self) -> tuple[list[CompletionOutput], list[str], list[list[int]]]:
        if self.beam is not None:
            hyps = self.beam.results()
            completions = [
                CompletionOutput(i, text, list(h.token_ids), h.cumulative_logprob, None, h.finish_reason)
                for i, (h, text) in enumerate(zip(hyps, self.beam_texts))
            ]
            return completions, [c.text for c in completions], [list(c.token_ids) for c in completions]
        chosen = self.outputs
        if len(chosen) > self.num_returned:
            chosen = sorted(chosen, key=lambda o: o.seq.cumulative_logprob, reverse=True)[: self.num_returned]
        completions, texts, ids = [], [], []
        for index, state in enumerate(chosen):
            seq = state.seq
            delta_text, delta_ids = state.delta()
            completions.append(
                CompletionOutput(
                    index=index,
                    text=state.text,
                    token_ids=list(seq.output_token_ids),
                    cumulative_logprob=seq.cumulative_logprob,
                    logprobs=seq.logprobs,
                    finish_reason=seq.finish_reason,
                    stop_reason=seq.stop_reason,
                )
            )
            texts.append(delta_text)
            ids.append(delta_ids)
        return completions, texts, ids
