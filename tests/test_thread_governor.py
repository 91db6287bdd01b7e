"""ThreadGovernor: the worker uses the thread count its own steps measure fastest, and measures again when
steps slow down (simulated step times; the real effect is in docs/PERFORMANCE.md)."""

from __future__ import annotations

import pytest
import torch

from kvserve.config import EngineConfig, available_cores
from kvserve.engine_args import add_engine_arguments, engine_config_from_args
from kvserve.executor.thread_governor import ThreadGovernor


@pytest.fixture(autouse=True)
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def run_steps(governor: ThreadGovernor, step_seconds: dict[int, float], count: int, num_tokens: int = 8) -> list[int]:
    """Run `count` steps whose time depends on the threads in use; the thread counts they ran with."""
    used = []
    for _ in range(count):
        governor.before_step(num_tokens)
        used.append(torch.get_num_threads())
        governor.after_step(num_tokens, step_seconds[torch.get_num_threads()])
    return used


def test_it_keeps_the_faster_thread_count_and_switches_when_that_changes():
    governor = ThreadGovernor(4, reprobe_s=3600)
    assert governor.candidates == [4, 3, 2, 1]
    idle = {4: 0.010, 3: 0.012, 2: 0.016, 1: 0.030}
    probing = run_steps(governor, idle, 8)
    assert sorted(probing) == [1, 1, 2, 2, 3, 3, 4, 4]  # each candidate timed twice
    assert run_steps(governor, idle, 5) == [4] * 5
    busy_core = {4: 0.040, 3: 0.011, 2: 0.017, 1: 0.031}  # a neighbour took a core: 4 threads wait on it
    first = run_steps(governor, busy_core, 1)
    assert first == [4] and governor.measuring  # 4x slower than measured: measure again at once
    run_steps(governor, busy_core, 8)
    assert run_steps(governor, busy_core, 3) == [3] * 3


def test_only_steps_of_the_anchor_shape_try_other_thread_counts():
    """Prefill chunks of ever-changing sizes never repeat: they all run on the current choice (a measurement
    waits for its anchor shape, then gives up and anchors again), and repeating decode steps decide."""
    governor = ThreadGovernor(2, reprobe_s=3600)
    used = []
    for num_tokens in range(100, 100 + 64):  # 64 steps, each of a new shape
        governor.before_step(num_tokens)
        used.append(torch.get_num_threads())
        governor.after_step(num_tokens, 0.01)
    assert used == [2] * 64 and governor.measuring
    assert sorted(run_steps(governor, {2: 0.02, 1: 0.01}, 4, num_tokens=1)) == [1, 1, 2, 2]
    assert not governor.measuring and governor.threads == 1


def test_it_measures_again_after_a_while(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr("kvserve.executor.thread_governor.time.monotonic", lambda: clock[0])
    governor = ThreadGovernor(2, reprobe_s=5.0)
    run_steps(governor, {2: 0.01, 1: 0.02}, 4)
    assert governor.threads == 2 and not governor.measuring
    clock[0] = 10.0
    run_steps(governor, {2: 0.01, 1: 0.02}, 1)
    assert governor.measuring


def test_one_thread_has_nothing_to_choose():
    governor = ThreadGovernor(1)
    assert run_steps(governor, {1: 0.01}, 3) == [1, 1, 1] and not governor.measuring


def test_threads_options():
    import argparse

    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    config = engine_config_from_args(parser.parse_args(["-t", "3", "--no-adaptive-threads"]))
    assert config.num_threads == 3 and config.adaptive_threads is False
    assert EngineConfig().num_threads == available_cores()
    with pytest.raises(ValueError, match="num_threads must be an integer >= 1"):
        EngineConfig(num_threads=0)
