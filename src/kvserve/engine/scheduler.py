"""Scheduler: iteration-level (continuous) batching with a token budget per step.

Every step starts from scratch: running sequences first (decodes before prompt
chunks, one token each), then waiting prompts in arrival order fill what is left
of `max_num_batched_tokens` and `max_num_seqs`. With chunked prefill a prompt
larger than the remaining budget is split over several steps, so a long prompt
never stalls the decodes sharing its steps (SplitFuse).

When the block pool runs dry, the newest running sequence is preempted: its
blocks are freed and it goes back to the front of the queue with all its tokens,
to be recomputed later (often cheaply, from the prefix cache). Nothing is lost.

Sequences of one request (n>1 outputs, beams) are ordinary running sequences
that happen to share blocks: each is scheduled, preempted and recomputed on its
own tokens. A request is admitted only when all the sequences it will fork
into (`fan_out`) fit under `max_num_seqs`. A beam whose logprobs are computed
but not yet used (`parked`: it waits for its sibling beams) has nothing to run
and is skipped, running or waiting; if nothing else can run, a running parked
beam is preempted to make room, so its siblings always get their turn, even
when the cache cannot hold all beams at once.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from kvserve.engine.block_manager import BlockManager
from kvserve.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    """What runs in one step: each sequence with its number of new tokens."""

    seqs: list[Sequence]
    num_new_tokens: list[int]
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    num_preempted: int = 0

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def is_empty(self) -> bool:
        return not self.seqs


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        enable_chunked_prefill: bool,
        max_seq_len: int,
        eos_token_ids: set[int],
    ) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_chunked_prefill = enable_chunked_prefill
        self.max_seq_len = max_seq_len
        self.eos_token_ids = eos_token_ids
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- scheduling -------------------------------------------------------------

    def schedule(self) -> ScheduledBatch:
        bm = self.block_manager
        budget = self.max_num_batched_tokens
        seqs: list[Sequence] = []
        counts: list[int] = []
        scheduled: set[int] = set()
        preempted = 0

        decodes_first = sorted(self.running, key=lambda s: s.num_uncomputed_tokens > 1)
        for seq in decodes_first:
            if budget == 0:
                break
            if seq.status != SequenceStatus.RUNNING or seq.parked:
                continue  # preempted earlier in this loop, or a beam waiting for its siblings
            n = min(seq.num_uncomputed_tokens, budget)
            while not bm.allocate(seq, n):
                victim = next(s for s in reversed(self.running) if s.seq_id not in scheduled)
                self._preempt(victim)
                preempted += 1
                if victim is seq:
                    break
            if seq.status != SequenceStatus.RUNNING:
                continue
            seqs.append(seq)
            counts.append(n)
            scheduled.add(seq.seq_id)
            budget -= n

        for seq in list(self.waiting):
            if budget == 0 or preempted:
                break
            if seq.parked:
                continue  # a beam with its logprobs already computed: nothing to run until its siblings catch up
            if len(self.running) + seq.fan_out > self.max_num_seqs:
                break
            cached = [] if seq.needs_prompt_logprobs else bm.cached_prefix(seq)
            num_cached = len(cached) * bm.block_size
            n = len(seq) - num_cached
            if n > budget:
                if not self.enable_chunked_prefill:
                    break
                n = budget
            if not self._allocate_or_unpark(seq, n, cached, nothing_scheduled=not seqs):
                break
            bm.prefix_cache_queries += len(seq)
            bm.prefix_cache_hits += num_cached
            if seq.num_preemptions == 0:
                seq.num_cached_tokens = num_cached
            self.waiting.remove(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            seqs.append(seq)
            counts.append(n)
            budget -= n

        return ScheduledBatch(seqs, counts, bm.take_pending_copies(), preempted)

    def _allocate_or_unpark(self, seq: Sequence, n: int, cached: list[int], nothing_scheduled: bool) -> bool:
        """Allocate for a waiting sequence. When the step would otherwise be empty, parked
        beams (which hold blocks but need no compute now) are preempted, newest first, to make room."""
        while not self.block_manager.allocate(seq, n, cached):
            parked = [s for s in self.running if s.parked]
            if not nothing_scheduled or not parked:
                return False
            self._preempt(parked[-1])
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    # ---- after the forward ------------------------------------------------------

    def update(self, batch: ScheduledBatch, sampled: dict[int, int]) -> list[Sequence]:
        """Advance computed counts and append sampled tokens (`sampled`: seq_id -> token).

        Returns the sequences that received a new token this step. Sequences that hit
        a token-based stop (EOS, stop token, max_tokens, context length) are finished.
        """
        bm = self.block_manager
        grown: list[Sequence] = []
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += n
            bm.register_full_blocks(seq)
            token = sampled.get(seq.seq_id)
            if token is None:
                continue  # a prompt chunk that did not reach the end yet, or a beam
            children, seq.children_to_fork = seq.children_to_fork, []
            seq.fan_out = 1
            for child in children:
                self.fork(seq, child)
            for s in [seq, *children]:
                s.append_token(sampled[s.seq_id])
                grown.append(s)
                self._check_token_stop(s, sampled[s.seq_id])
        return grown

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Start `child` next to `parent`: sharing all its blocks (copy-on-write) if it runs,
        or queued right behind it, to be computed from its tokens, if it was preempted."""
        if parent.status == SequenceStatus.RUNNING:
            self.block_manager.fork(parent, child)
            child.status = SequenceStatus.RUNNING
            self.running.append(child)
            return
        child.block_table = []
        child.num_computed_tokens = 0
        child.status = SequenceStatus.WAITING
        self.waiting.insert(self.waiting.index(parent) + 1, child)

    def _check_token_stop(self, seq: Sequence, token: int) -> None:
        params = seq.params
        if seq.num_output_tokens >= params.min_tokens:
            if token in params.stop_token_ids:
                self.finish(seq, "stop", token)
                return
            if not params.ignore_eos and token in self.eos_token_ids:
                self.finish(seq, "stop", None)
                return
        if params.max_tokens is not None and seq.num_output_tokens >= params.max_tokens:
            self.finish(seq, "length")
        elif len(seq) >= self.max_seq_len:
            self.finish(seq, "length")

    def finish(self, seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        if seq.is_finished:
            return
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.stop_reason = stop_reason
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)

    def abort(self, request_id: str, reason: str = "abort") -> list[Sequence]:
        """Finish every queued or running sequence of a request (freeing its blocks) with `reason`."""
        found = [s for s in list(self.running) + list(self.waiting) if s.request_id == request_id]
        for seq in found:
            self.finish(seq, reason)
        return found
