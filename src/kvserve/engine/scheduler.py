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
that happen to share blocks; their `SequenceGroup` decides when they fork and
end, and the scheduler applies it. A request is admitted only when all the
sequences it will fork into fit under `max_num_seqs`. A beam whose logprobs are
computed but not yet used (`parked`: it waits for its sibling beams) has nothing
to run and is skipped, running or waiting; if nothing else can run, a running
parked beam is preempted to make room, so its siblings always get their turn,
even when the cache cannot hold all beams at once.

With a model whose every layer has a sliding window, each sequence's blocks
behind its next query's window are released after every step
(`BlockManager.drop_outside_window`), so a sequence holds about window /
block_size + 1 blocks (plus a prompt chunk's, and its sink blocks with attention
sinks) however long it grows.

An output constrained by a grammar (structured output) gets its next-token mask
computed here for every step in which it samples (`grammar_bitmask`), and each
token it samples is accepted into its grammar state; when the grammar is complete
and ends (its stop token accepted) the output finishes with "stop".

Speculative decoding (`speculative_config`): a decoding sequence may carry
proposed next tokens (spec_decode/speculator.py) after its last one, prompt-lookup
tokens found here or slots for the runner's draft model to fill; they take
budget and KV slots like prompt tokens, the runner verifies them, and `update()`
counts as computed only the accepted ones, appends them with the token sampled
after them, and frees the blocks that held only rejected ones
(`BlockManager.trim`). Unverified tokens are never in `token_ids`, so the prefix
cache never registers them. Outputs under a grammar do not speculate (each
proposal would need its own mask).

The scheduler owns the block manager and is the one writer of every sequence's
status, computed count, tokens and grammar state. `schedule()` hands the model runner a
`SchedulerOutput` (plain data); `update()` takes its `ModelRunnerOutput` back.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field

from kvserve.engine.block_manager import BlockManager
from kvserve.engine.runner_output import ModelRunnerOutput
from kvserve.engine.scheduler_output import CachedSequenceData, NewSequenceData, SchedulerOutput
from kvserve.engine.sequence import Sequence, SequenceStatus
from kvserve.engine.sequence_group import BeamStep, SequenceGroup
from kvserve.engine.snapshot import PoolSnapshot, SequenceSnapshot
from kvserve.spec_decode.config import SpeculativeConfig
from kvserve.spec_decode.speculator import SpecDecodeStats, Speculator
from kvserve.structured_output.grammar_state import grammar_bitmask

logger = logging.getLogger(__name__)


@dataclass
class SequenceStats:
    """One running sequence, as the pool sees it."""

    seq_id: int
    request_id: str
    num_blocks: int  # held: blocks dropped behind a sliding window are not counted
    num_computed_tokens: int
    num_tokens: int
    num_prompt_tokens: int
    max_tokens: int | None


@dataclass
class SchedulerStats:
    """A snapshot of the queues and the block pool (what the server, metrics, estimator and bench read)."""

    num_running: int
    num_waiting: int
    num_preemptions: int  # since start
    num_blocks: int
    block_size: int
    num_free_blocks: int  # not held by a live sequence (cached-but-free ones included)
    num_cached_free_blocks: int  # free, but still holding a reusable cached prefix
    kv_cache_usage: float  # fraction of blocks held by live sequences
    prefix_cache_queries: int  # prompt tokens looked up, since start
    prefix_cache_hits: int  # prompt tokens found, since start
    running: list[SequenceStats] = field(default_factory=list)
    spec_decode: SpecDecodeStats | None = None  # with speculative decoding: proposals made and accepted, since start
    replicas: list[SchedulerStats] = field(default_factory=list)  # each data-parallel replica's own (empty for one engine)

    @property
    def blocks_per_request(self) -> dict[str, int]:
        """Blocks held per running request (a block shared by several of its sequences counts once per sequence)."""
        counts: dict[str, int] = {}
        for seq in self.running:
            counts[seq.request_id] = counts.get(seq.request_id, 0) + seq.num_blocks
        return counts


@dataclass
class SchedulerUpdate:
    """What a step changed: the sequences that got tokens (and how many each: more than one when proposals
    were accepted), the beam searches that ended, the step's sequences by id, and how many of its tokens were
    prefill (chunks that started inside the prompt).

    `num_context_tokens`: the keys the step's attention read, each sequence's context up to its last new
    token; `num_attention_pairs`: the (query, key) pairs it weighed. Both count only keys inside the sliding
    window when every layer has one; the roofline point of the step is computed from them."""

    grown: list[Sequence]
    num_new_tokens: dict[int, int]
    finished_beam_groups: list[SequenceGroup]
    scheduled: dict[int, Sequence]
    num_prefill_tokens: int
    num_context_tokens: int = 0
    num_attention_pairs: int = 0


class Scheduler:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        enable_chunked_prefill: bool,
        max_seq_len: int,
        eos_token_ids: set[int],
        sliding_window: int | None = None,
        attention_sinks: int = 0,
        block_offset: int = 0,
        speculative_config: SpeculativeConfig | None = None,
    ) -> None:
        """`sliding_window`: the window of every layer (the widest), when all have one (attention/sliding_window.py);
        `attention_sinks`: the first tokens every layer keeps beside it (attention/attention_sinks.py).
        `block_offset`: where this scheduler's blocks start in the cache the workers hold (a pipeline's virtual
        engines each schedule their own range of one cache); the block manager counts from 0."""
        self.block_offset = block_offset
        self.block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching, sliding_window, attention_sinks)
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_chunked_prefill = enable_chunked_prefill
        self.max_seq_len = max_seq_len
        self.eos_token_ids = eos_token_ids
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.groups: dict[str, SequenceGroup] = {}
        self.num_preemptions = 0
        self._scheduled: dict[int, Sequence] = {}  # the sequences of the last schedule()
        self._finished_seq_ids: list[int] = []  # for the runner to forget, with the next output
        self.speculator = None if speculative_config is None else Speculator(speculative_config)

    def add(self, group: SequenceGroup) -> None:
        self.groups[group.request_id] = group
        self.waiting.append(group.first)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def stats(self) -> SchedulerStats:
        bm = self.block_manager
        running = [
            SequenceStats(s.seq_id, s.request_id, len(bm.held_blocks(s.seq_id)), s.num_computed_tokens, len(s.token_ids),
                          s.num_prompt_tokens, s.params.max_tokens)
            for s in self.running
        ]
        return SchedulerStats(
            num_running=len(self.running), num_waiting=len(self.waiting), num_preemptions=self.num_preemptions,
            num_blocks=bm.num_blocks, block_size=bm.block_size, num_free_blocks=bm.num_free_blocks,
            num_cached_free_blocks=bm.num_cached_free_blocks, kv_cache_usage=bm.usage(),
            prefix_cache_queries=bm.prefix_cache_queries, prefix_cache_hits=bm.prefix_cache_hits, running=running,
            spec_decode=None if self.speculator is None else self.speculator.stats.copy(),
        )

    def snapshot(self) -> PoolSnapshot:
        """The block pool and every running sequence's block table, copied (for the live dashboard)."""
        bm = self.block_manager
        sequences = [
            SequenceSnapshot(s.seq_id, s.request_id, bm.display_table(s.seq_id), s.num_computed_tokens, len(s.token_ids),
                             s.num_prompt_tokens, s.num_cached_tokens, s.num_preemptions)
            for s in self.running
        ]
        return PoolSnapshot(bm.block_size, bm.pool_state(), sequences, len(self.waiting), bm.prefix_cache_queries,
                            bm.prefix_cache_hits, self.num_preemptions)

    # ---- scheduling -------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        bm = self.block_manager
        budget = self.max_num_batched_tokens
        scheduled: list[tuple[Sequence, int, bool]] = []  # (seq, tokens, whole block table to send)
        scheduled_ids: set[int] = set()
        spec: dict[int, list[int]] = {}  # seq_id -> proposed tokens, verified in this step
        num_draft: dict[int, int] = {}  # seq_id -> tokens the runner's draft model proposes and verifies this step
        preempted = 0

        decodes_first = sorted(self.running, key=lambda s: s.num_uncomputed_tokens > 1)
        for seq in decodes_first:
            if budget == 0:
                break
            if seq.status != SequenceStatus.RUNNING or seq.parked:
                continue  # preempted earlier in this loop, or a beam waiting for its siblings
            n = min(seq.num_uncomputed_tokens, budget)
            num_spec = self._propose(seq, n, budget, spec, num_draft)
            n += num_spec
            while not num_spec and not bm.allocate(seq, n):
                victim = next(s for s in reversed(self.running) if s.seq_id not in scheduled_ids)
                self._preempt(victim)
                preempted += 1
                if victim is seq:
                    break
            if seq.status != SequenceStatus.RUNNING:
                continue
            scheduled.append((seq, n, False))
            scheduled_ids.add(seq.seq_id)
            budget -= n

        for seq in list(self.waiting):
            if budget == 0 or preempted:
                break
            if seq.parked:
                continue  # a beam with its logprobs already computed: nothing to run until its siblings catch up
            if len(self.running) + self.groups[seq.request_id].fan_out(seq) > self.max_num_seqs:
                break
            cached = [] if seq.needs_prompt_logprobs else bm.cached_prefix(seq)
            num_cached = len(cached) * bm.block_size
            n = len(seq) - num_cached
            if n > budget:
                if not self.enable_chunked_prefill:
                    break
                n = budget
            if not self._allocate_or_unpark(seq, n, cached, nothing_scheduled=not scheduled):
                break
            seq.num_computed_tokens += num_cached
            if seq.num_preemptions == 0:
                seq.num_cached_tokens = num_cached
            self.waiting.remove(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled.append((seq, n, True))
            budget -= n

        self._scheduled = {seq.seq_id: seq for seq, _, _ in scheduled}
        finished, self._finished_seq_ids = self._finished_seq_ids, []
        new_seqs: list[NewSequenceData] = []
        cached_seqs: list[CachedSequenceData] = []
        for seq, _, resumed in scheduled:
            if seq.num_tokens_sent == 0:
                new_seqs.append(self._new_data(seq))
            else:
                cached_seqs.append(self._cached_data(seq, resumed))
            seq.num_tokens_sent = len(seq.token_ids)
        copies = [(src + self.block_offset, dst + self.block_offset) for src, dst in bm.take_pending_copies()]
        # outputs under a grammar that sample this step: their masks go with the step
        constrained = [seq for seq, n, _ in scheduled if seq.grammar is not None and seq.num_computed_tokens + n == len(seq)]
        return SchedulerOutput(
            new_seqs, cached_seqs, {seq.seq_id: n for seq, n, _ in scheduled}, finished, copies, preempted,
            grammar_seq_ids=[seq.seq_id for seq in constrained],
            grammar_bitmask=grammar_bitmask([seq.grammar for seq in constrained]) if constrained else None,
            spec_token_ids=spec, num_draft_tokens=num_draft,
        )

    def _propose(self, seq: Sequence, n: int, budget: int, spec: dict[int, list[int]], num_draft: dict[int, int]) -> int:
        """Proposals to verify after a decoding sequence's last one, with KV slots allocated for it and them:
        prompt-lookup tokens go into `spec`, a count for the runner's draft model into `num_draft`. Returns how
        many (0: none, nothing allocated)."""
        speculator = self.speculator
        if speculator is None or n != 1 or seq.num_uncomputed_tokens != 1 or seq.grammar is not None:
            return 0
        limit = min(budget - 1, self.max_seq_len - len(seq) - 1)
        if seq.params.max_tokens is not None:
            limit = min(limit, seq.params.max_tokens - seq.num_output_tokens - 1)  # every accepted token is emitted
        if speculator.config.method == "ngram":
            draft = speculator.propose(seq, len(self.running), limit)
            k = len(draft)
        else:
            draft, k = [], speculator.num_proposals(seq, len(self.running), limit)
        if not k or not self.block_manager.allocate(seq, 1 + k):
            return 0
        if draft:
            spec[seq.seq_id] = draft
        else:
            num_draft[seq.seq_id] = k
        return k

    def _cache_ids(self, block_ids: list[int]) -> list[int]:
        """Block ids as the workers' cache numbers them."""
        offset = self.block_offset
        return [b + offset for b in block_ids] if offset else list(block_ids)

    def _new_data(self, seq: Sequence) -> NewSequenceData:
        forks = self.groups[seq.request_id].to_fork if seq is self.groups[seq.request_id].first else []
        return NewSequenceData(
            seq.seq_id, seq.request_id, list(seq.token_ids), seq.num_prompt_tokens, seq.params, seq.seed,
            self._cache_ids(self.block_manager.block_table(seq.seq_id)), seq.num_computed_tokens, seq.is_beam, seq.bad_words_token_ids,
            len(seq.prompt_logprobs) if seq.prompt_logprobs is not None else 0, [(c.seq_id, c.seed) for c in forks],
        )

    def _cached_data(self, seq: Sequence, resumed: bool) -> CachedSequenceData:
        """Only what changed: tokens appended since the runner last saw it, and the block table from the block
        of the first uncomputed token (earlier blocks of a running sequence never change; a resumed one
        gets its whole table)."""
        block_start = 0 if resumed else seq.num_computed_tokens // self.block_manager.block_size
        table = self.block_manager.block_table(seq.seq_id)
        return CachedSequenceData(
            seq.seq_id, seq.request_id, seq.num_computed_tokens, seq.num_tokens_sent, seq.token_ids[seq.num_tokens_sent :],
            block_start, self._cache_ids(table[block_start:]),
        )

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
        self.block_manager.free(seq.seq_id)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    # ---- after the forward ------------------------------------------------------

    def update(self, output: SchedulerOutput, result: ModelRunnerOutput) -> SchedulerUpdate:
        """Advance computed counts, append sampled tokens, fork new outputs, apply beam steps.

        Sequences that hit a token-based stop (EOS, stop token, max_tokens, context length) are finished.
        """
        bm = self.block_manager
        grown: list[Sequence] = []
        new_tokens: dict[int, int] = {}
        finished_beams: list[SequenceGroup] = []
        prefill = context = pairs = 0
        window = bm.sliding_window
        for seq_id, n in output.num_scheduled_tokens.items():
            seq = self._scheduled[seq_id]
            if seq.num_computed_tokens < seq.num_prompt_tokens:
                prefill += n
            context += _keys_read(seq.num_computed_tokens, n, window)  # proposals' rows included: they were computed
            pairs += _attention_pairs(seq.num_computed_tokens, n, window)
            num_spec = output.num_spec_tokens(seq_id)
            tokens = result.sampled.get(seq_id)
            if num_spec:
                appended = self._verified(seq, n, num_spec, tokens, result.logprobs.get(seq_id))
                if appended:
                    grown.append(seq)
                    new_tokens[seq_id] = appended
                continue
            seq.num_computed_tokens += n
            bm.register_full_blocks(seq)
            bm.drop_outside_window(seq)
            if tokens is not None:
                forks = self.groups[seq.request_id].take_forks(seq)
                for child in forks:
                    self.fork(seq, child)
                for s in (seq, *forks):
                    new_tokens[s.seq_id] = self._append(s, result.sampled[s.seq_id], result.logprobs.get(s.seq_id))
                    grown.append(s)
            elif seq_id in result.beam_logprobs:
                group = self.groups[seq.request_id]
                step = group.receive_beam_logprobs(seq, result.beam_logprobs[seq_id])
                if step is not None:
                    self._apply_beam_step(step)
                    if step.done:
                        finished_beams.append(group)
        return SchedulerUpdate(grown, new_tokens, finished_beams, self._scheduled, prefill, context, pairs)

    def _verified(self, seq: Sequence, n: int, num_spec: int, tokens: list[int] | None, logprobs: list[float] | None) -> int:
        """A sequence's step with `num_spec` proposals: its own token and the accepted proposals are computed
        (the accepted ones are also the first of `tokens`, the runner's), then the blocks that held only
        rejected proposals go back to the pool. Returns how many tokens were appended."""
        accepted = 0 if tokens is None else len(tokens) - 1
        seq.num_computed_tokens += n - num_spec + accepted
        appended = 0
        if tokens is not None:
            self.speculator.record(seq, num_spec, accepted)
            appended = self._append(seq, tokens, logprobs)
        if not seq.is_finished:  # a stop among the accepted tokens freed every block already
            self.block_manager.register_full_blocks(seq)
            self.block_manager.drop_outside_window(seq)
            self.block_manager.trim(seq)
        return appended

    def _append(self, seq: Sequence, tokens: list[int], logprobs: list[float] | None) -> int:
        """Append a step's tokens up to the first that ends the sequence; how many were appended."""
        for i, token in enumerate(tokens):
            seq.append_token(token)
            seq.cumulative_logprob += logprobs[i] if logprobs else 0.0
            if seq.grammar is not None and not seq.grammar.accept(token):  # the mask makes this impossible: a bug
                logger.error("sequence %d of request %s sampled token %d, which its grammar does not allow; ending it",
                             seq.seq_id, seq.request_id, token)
                self.finish(seq, "error")
                return i + 1
            self._check_token_stop(seq, token)
            if seq.grammar is not None and seq.grammar.terminated:
                self.finish(seq, "stop")  # (when its stop token was EOS, the output already ended above)
            if seq.is_finished:
                return i + 1
        return len(tokens)

    def truncate_output(self, seq: Sequence, num_tokens: int, logprob: float) -> None:
        """Drop a finished sequence's last `num_tokens` tokens (whose logprobs sum to `logprob`): a stop string
        ended it at an earlier token of the same step."""
        assert seq.is_finished and num_tokens <= seq.num_output_tokens
        del seq.token_ids[len(seq.token_ids) - num_tokens :]
        seq.cumulative_logprob -= logprob

    def _apply_beam_step(self, step: BeamStep) -> None:
        for seq in step.dropped:
            self.finish(seq, "stop" if step.done else "pruned")  # frees its blocks now
        for seq, token, score in step.beams:
            parent = step.forked.get(seq.seq_id)
            if parent is not None:
                self.fork(parent, seq)
        for seq, token, score in step.beams:
            seq.append_token(token)
            seq.cumulative_logprob = score

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Start `child` next to `parent`: sharing all its blocks (copy-on-write) if it runs,
        or queued right behind it, to be computed from its tokens, if it was preempted."""
        if parent.status == SequenceStatus.RUNNING:
            self.block_manager.fork(parent.seq_id, child.seq_id)
            child.num_computed_tokens = parent.num_computed_tokens
            child.status = SequenceStatus.RUNNING
            self.running.append(child)
            return
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
        self.block_manager.free(seq.seq_id)
        if self.speculator is not None:
            self.speculator.forget(seq.seq_id)
        self._finished_seq_ids.append(seq.seq_id)  # the runner may hold its state, or its generator if it forked

    def abort(self, request_id: str, reason: str = "abort") -> None:
        """Finish every sequence of a request, queued, running or not yet forked, with `reason`, and forget it."""
        group = self.groups.pop(request_id, None)
        if group is None:
            return
        for seq in [s for s in (*self.running, *self.waiting) if s.request_id == request_id] + group.to_fork:
            self.finish(seq, reason)
        group.to_fork = []

    def forget(self, request_id: str) -> None:
        """Drop a finished request's group."""
        self.groups.pop(request_id, None)


def _keys_read(computed: int, n: int, window: int | None) -> int:
    """Keys the attention of `n` new tokens after `computed` cached ones reads: all of them, or the window's
    reach (the first new query's window through the last new token)."""
    total = computed + n
    return total if window is None else min(total, window - 1 + n)


def _attention_pairs(computed: int, n: int, window: int | None) -> int:
    """(query, key) pairs of `n` causal queries at positions computed .. computed+n-1: query p weighs p+1 keys,
    or at most `window`."""
    if window is None:
        return n * computed + n * (n + 1) // 2
    growing = max(0, min(window - computed, n))  # queries whose p + 1 is still within the window
    return growing * computed + growing * (growing + 1) // 2 + (n - growing) * window
