"""The scheduler and its block manager with no model: a fake runner samples fixed tokens from the plain-data
SchedulerOutput, so batching, chunking, preemption, fan-out admission, parked beams and the step contract
itself are checked in milliseconds."""

from __future__ import annotations

import random

import pytest
import torch

from kvserve.engine.beam_search import BeamSearch
from kvserve.engine.runner_output import ModelRunnerOutput
from kvserve.engine.runner_state import RunnerState
from kvserve.engine.scheduler import Scheduler
from kvserve.engine.sequence import Sequence, SequenceStatus
from kvserve.engine.sequence_group import SequenceGroup
from kvserve.sampling_params import BeamSearchParams, SamplingParams

EOS = 1
TOKEN = 7  # what the fake runner samples


def make_scheduler(num_blocks: int = 64, block_size: int = 4, max_num_seqs: int = 8, budget: int = 32,
                   chunked: bool = True, max_seq_len: int = 1000, caching: bool = True, window: int | None = None) -> Scheduler:
    return Scheduler(num_blocks, block_size, caching, max_num_seqs, budget, chunked, max_seq_len, {EOS}, window)


def add(scheduler: Scheduler, request_id: str, prompt_len: int, max_tokens: int = 5, n: int = 1) -> list[Sequence]:
    params = SamplingParams(n=n, max_tokens=max_tokens, ignore_eos=True, temperature=0)
    prompt = [100 + hash(request_id) % 50 + i for i in range(prompt_len)]
    seqs = [Sequence(request_id, prompt, params) for _ in range(n)]
    scheduler.add(SequenceGroup(request_id, seqs[0], seqs[1:]))
    return seqs


class FakeRunner:
    """Keeps its sequences from the SchedulerOutputs alone (as the real runner does) and samples TOKEN
    for every sequence that reaches its end, and for the outputs splitting off it."""

    def __init__(self) -> None:
        self.state = RunnerState(block_size=4)
        self.steps: list = []

    def execute(self, output) -> ModelRunnerOutput:
        self.state.apply(output)
        self.steps.append(output)
        result = ModelRunnerOutput()
        for seq_id, n in output.num_scheduled_tokens.items():
            seq = self.state.seqs[seq_id]
            assert seq.num_computed_tokens + n <= len(seq.token_ids)
            if seq.num_computed_tokens + n == len(seq.token_ids):
                if seq.is_beam:
                    row = torch.full((200,), -10.0)
                    row[TOKEN] = -0.1
                    row[TOKEN + 1] = -0.2
                    result.beam_logprobs[seq_id] = torch.log_softmax(row, dim=0)
                    continue
                for sid in (seq_id, *(c for c, _ in seq.fork_seeds)):
                    result.sampled[sid] = [TOKEN]
                seq.fork_seeds = []
        return result


def run_step(scheduler: Scheduler, runner: FakeRunner):
    output = scheduler.schedule()
    result = runner.execute(output)
    scheduler.update(output, result)
    return output


def test_decodes_go_first_and_the_token_budget_holds():
    scheduler, runner = make_scheduler(budget=10), FakeRunner()
    a, = add(scheduler, "a", 6)
    first = run_step(scheduler, runner)
    assert first.num_scheduled_tokens == {a.seq_id: 6}
    b, = add(scheduler, "b", 30)  # longer than the budget: chunked
    second = run_step(scheduler, runner)
    assert list(second.num_scheduled_tokens.items()) == [(a.seq_id, 1), (b.seq_id, 9)]  # the decode first
    third = run_step(scheduler, runner)
    assert list(third.num_scheduled_tokens.values()) == [1, 9] and third.total_num_scheduled_tokens == 10
    assert b.num_computed_tokens == 18 and b.num_output_tokens == 0


def test_without_chunked_prefill_a_long_prompt_waits_for_a_whole_budget():
    scheduler, runner = make_scheduler(budget=10, chunked=False), FakeRunner()
    add(scheduler, "a", 4)
    b, = add(scheduler, "b", 8)
    out = run_step(scheduler, runner)
    assert b.seq_id not in out.num_scheduled_tokens  # 4 + 8 > 10: not split, waits
    assert b.seq_id in run_step(scheduler, runner).num_scheduled_tokens


def test_the_newest_running_sequence_is_preempted_and_recomputed_with_nothing_lost():
    scheduler, runner = make_scheduler(num_blocks=6, block_size=4, budget=64), FakeRunner()
    a, = add(scheduler, "a", 8, max_tokens=12)
    b, = add(scheduler, "b", 8, max_tokens=12)
    run_step(scheduler, runner)  # both prefill: 4 blocks; then decodes need more
    preempted_at = None
    for i in range(40):
        out = run_step(scheduler, runner)
        if out.num_preempted and preempted_at is None:
            preempted_at = i
            assert b.status == SequenceStatus.WAITING and b.num_computed_tokens == 0  # the newer one
            assert scheduler.waiting[0] is b
        if not scheduler.has_unfinished():
            break
    assert preempted_at is not None and scheduler.num_preemptions >= 1
    assert a.output_token_ids == b.output_token_ids == [TOKEN] * 12
    assert scheduler.stats().num_free_blocks == 6


def test_a_request_is_admitted_only_when_all_its_outputs_fit():
    scheduler, runner = make_scheduler(max_num_seqs=4), FakeRunner()
    add(scheduler, "one", 4)
    four = add(scheduler, "four", 4, n=4)
    out = run_step(scheduler, runner)
    assert four[0].seq_id not in out.num_scheduled_tokens  # 1 running + 4 > 4
    while any(s.status != SequenceStatus.FINISHED for s in scheduler.running if s.request_id == "one"):
        run_step(scheduler, runner)
    run_step(scheduler, runner)
    assert all(s.status == SequenceStatus.RUNNING for s in four) and len(scheduler.running) == 4
    bm = scheduler.block_manager
    assert len({tuple(bm.block_table(s.seq_id)) for s in four}) == 1  # the prompt's blocks, shared


def test_parked_beams_are_skipped_and_preempted_when_nothing_else_can_run():
    """3 beams of up to 18 tokens in 8 blocks of 4: they cannot all hold blocks at once, so beams that
    wait for their siblings (parked) are preempted to let the siblings run, and the search still ends."""
    scheduler, runner = make_scheduler(num_blocks=8, block_size=4, max_num_seqs=8, budget=64), FakeRunner()
    seq = Sequence("beam", list(range(10, 20)), SamplingParams(temperature=0, max_tokens=None, ignore_eos=True))
    seq.is_beam = True
    search = BeamSearch(BeamSearchParams(beam_width=3, max_tokens=8, ignore_eos=True), {EOS}, 8, seq)
    scheduler.add(SequenceGroup("beam", seq, beam=search))
    for _ in range(100):
        if not scheduler.has_unfinished():
            break
        parked = {s.seq_id for s in (*scheduler.running, *scheduler.waiting) if s.parked}
        output = scheduler.schedule()
        assert not parked & set(output.num_scheduled_tokens)  # a parked beam needs no compute
        scheduler.update(output, runner.execute(output))
    assert search.done and len(search.results()) == 3
    assert scheduler.num_preemptions > 0
    assert scheduler.stats().num_free_blocks == 8


@pytest.mark.parametrize("window", [None, 6])
def test_the_runner_mirrors_the_scheduler_from_the_plain_data_alone(window):
    """Random requests through a small cache (preemptions, prefix hits, forks): after every schedule, the
    runner's tokens, block tables and computed counts, built only from SchedulerOutputs, equal the scheduler's.
    With a sliding window, the table entries behind the step's first window may differ (the runner is not
    told of dropped blocks); every entry a query of the step reads is equal, and a sequence holds only its
    window's and its chunk's blocks."""
    rng = random.Random(3)
    scheduler, runner = make_scheduler(num_blocks=14, block_size=4, max_num_seqs=6, budget=24, window=window), FakeRunner()
    bm = scheduler.block_manager
    most_dropped = 0
    shared = [5, 6, 7, 8, 9, 10, 11, 12]
    for step in range(200):
        if rng.random() < 0.4 and len(scheduler.groups) < 8:
            prompt_len = rng.randint(1, 14)
            n = rng.choice([1, 1, 2])
            params = SamplingParams(n=n, max_tokens=rng.randint(1, 24), ignore_eos=True, temperature=0)
            prompt = (shared + [rng.randint(20, 90) for _ in range(prompt_len)])[: max(1, prompt_len + rng.randint(0, 8))]
            seqs = [Sequence(f"r{step}", prompt, params) for _ in range(n)]
            scheduler.add(SequenceGroup(f"r{step}", seqs[0], seqs[1:]))
        output = scheduler.schedule()
        result = runner.execute(output)
        for seq_id in output.num_scheduled_tokens:
            mine = next(s for s in scheduler.running if s.seq_id == seq_id)
            theirs = runner.state.seqs[seq_id]
            assert theirs.token_ids == mine.token_ids
            assert theirs.num_computed_tokens == mine.num_computed_tokens
            read_from = 0 if window is None else max(0, mine.num_computed_tokens - window + 1) // 4
            assert len(theirs.block_table) == len(bm.block_table(seq_id))
            assert theirs.block_table[read_from:] == bm.block_table(seq_id)[read_from:]
            if window is not None:
                assert len(bm.held_blocks(seq_id)) <= (window - 1 + 24) // 4 + 2
                most_dropped = max(most_dropped, len(bm.block_table(seq_id)) - len(bm.held_blocks(seq_id)))
        scheduler.update(output, result)
        for group_id in [g for g in scheduler.groups if all(s.is_finished for s in _seqs_of(scheduler, g))]:
            scheduler.forget(group_id)
    assert scheduler.num_preemptions > 0 and scheduler.stats().prefix_cache_hits > 0
    assert window is None or most_dropped >= 5


def _seqs_of(scheduler: Scheduler, request_id: str) -> list[Sequence]:
    group = scheduler.groups[request_id]
    live = [s for s in (*scheduler.running, *scheduler.waiting) if s.request_id == request_id]
    return live or [group.first]


def test_aborting_forgets_the_group_and_tells_the_runner():
    scheduler, runner = make_scheduler(), FakeRunner()
    seqs = add(scheduler, "x", 6, max_tokens=20, n=3)
    run_step(scheduler, runner)
    run_step(scheduler, runner)
    scheduler.abort("x")
    assert "x" not in scheduler.groups and all(s.finish_reason == "abort" for s in seqs)
    out = scheduler.schedule()
    assert set(out.finished_seq_ids) == {s.seq_id for s in seqs}
    runner.execute(out)
    assert not runner.state.seqs and scheduler.stats().num_free_blocks == 64
