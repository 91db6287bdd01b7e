"""A request that fails inside an engine step ends alone, with an error output; a fault that no single request
explains raises EngineDeadError. Bad input is refused before anything runs."""

from __future__ import annotations

import pytest

from kvserve import LLM, SamplingParams
from kvserve.engine.llm_engine import EngineDeadError, LLMEngine
from kvserve.engine.model_runner import ModelRunner
from kvserve.layers.sampler import Sampler
from oracle import random_prompts

POISON = 666  # the seed that marks the request our injected faults pick on


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(str(tiny_llama), dtype="float32", kv_cache_memory_bytes=32 << 20)


def _batch() -> tuple[list[list[int]], list[SamplingParams]]:
    """Greedy and seeded-sampled requests of different lengths."""
    prompts = random_prompts([5 + 7 * i for i in range(12)], seed=11)
    params = [
        SamplingParams(temperature=0, max_tokens=12, ignore_eos=True) if i % 2 else
        SamplingParams(temperature=1.0, top_p=0.9, seed=100 + i, max_tokens=12, ignore_eos=True)
        for i in range(12)
    ]
    return prompts, params


def _with_poison(prompts: list[list[int]], params: list[SamplingParams], at: int) -> tuple[list[list[int]], list[SamplingParams]]:
    poison = SamplingParams(temperature=1.0, seed=POISON, max_tokens=12, ignore_eos=True)
    return prompts[:at] + [random_prompts([9], seed=5)[0]] + prompts[at:], params[:at] + [poison] + params[at:]


def test_a_request_failing_in_the_forward_or_sampler_ends_alone(llm, monkeypatch):
    prompts, params = _batch()
    clean = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)

    sample = Sampler.__call__

    def poisoned(self, logits, inputs):
        if any(p.seed == POISON for p in inputs.params):
            raise RuntimeError("this row cannot be sampled")
        return sample(self, logits, inputs)

    monkeypatch.setattr(Sampler, "__call__", poisoned)
    poisoned_prompts, poisoned_params = _with_poison(prompts, params, 5)
    outs = llm.generate(prompt_token_ids=poisoned_prompts, sampling_params=poisoned_params, use_tqdm=False)
    failed = outs.pop(5)
    assert failed.finished and failed.error is not None and "this row cannot be sampled" in failed.error
    assert [c.finish_reason for c in failed.outputs] == ["error"]
    # the others ran on as if nothing happened: same greedy tokens, and the same seeded draws
    # (the probes that found the culprit rewound the seeded generators)
    assert [o.error for o in outs] == [None] * len(outs)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in clean]
    monkeypatch.undo()
    again = llm.generate(prompt_token_ids=prompts[:3], sampling_params=params[:3], use_tqdm=False)
    assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in clean[:3]]


def test_a_request_failing_after_the_forward_ends_alone(llm, monkeypatch):
    prompts, params = _batch()
    clean = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    update = LLMEngine._update_text

    def poisoned(self, state, *args):
        if state.seq.params.seed == POISON and state.seq.num_output_tokens == 4:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "a detokenizer fault")
        return update(self, state, *args)

    monkeypatch.setattr(LLMEngine, "_update_text", poisoned)
    poisoned_prompts, poisoned_params = _with_poison(prompts, params, 0)
    outs = llm.generate(prompt_token_ids=poisoned_prompts, sampling_params=poisoned_params, use_tqdm=False)
    failed = outs.pop(0)
    assert failed.error is not None and "detokenizer fault" in failed.error
    assert failed.outputs[0].finish_reason == "error" and len(failed.outputs[0].token_ids) == 4  # what it had made
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in clean]


def test_bad_input_is_refused_before_anything_runs(llm):
    prompts, params = _batch()
    vocab = llm.llm_engine.hf_config.vocab_size
    params[7] = SamplingParams(top_k=vocab + 1)
    with pytest.raises(ValueError, match=rf"^prompt 7 of 12: top_k must be in \[1, {vocab}\]"):
        llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()  # the six queued before it were withdrawn
    params[7] = SamplingParams(top_k=vocab, max_tokens=2)  # the whole vocabulary is allowed
    assert len(llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)) == 12
    with pytest.raises(ValueError, match="^prompt 0 of 1: prompt must be valid Unicode text, but it holds a lone surrogate"):
        llm.generate(["hi \ud800"], use_tqdm=False)


@pytest.fixture
def fresh_llm(tiny_llama):
    return LLM(str(tiny_llama), dtype="float32", kv_cache_memory_bytes=32 << 20)


def test_a_fault_no_single_request_explains_kills_the_engine(fresh_llm, monkeypatch):
    execute = ModelRunner.execute

    def fails_when_shared(self, output):
        if len(set(output.request_ids().values())) > 1:
            raise RuntimeError("the batch cannot run")
        return execute(self, output)

    monkeypatch.setattr(ModelRunner, "execute", fails_when_shared)
    with pytest.raises(EngineDeadError, match="no single request explains it.*the batch cannot run"):
        fresh_llm.generate(prompt_token_ids=random_prompts([6, 9], seed=3), use_tqdm=False)


def test_single_request_steps_failing_in_a_row_kill_the_engine(fresh_llm, monkeypatch):
    def always_fails(self, output):
        raise RuntimeError("nothing runs")

    monkeypatch.setattr(ModelRunner, "execute", always_fails)
    for i in range(3):  # each alone could be the request's fault: it ends with an error, the engine lives on
        out = fresh_llm.generate(prompt_token_ids=random_prompts([6], seed=i), use_tqdm=False)[0]
        assert out.error is not None and out.outputs[0].finish_reason == "error"
    with pytest.raises(EngineDeadError, match="4 steps in a row failed"):
        fresh_llm.generate(prompt_token_ids=random_prompts([6], seed=9), use_tqdm=False)
