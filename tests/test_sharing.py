"""Shared KV blocks at work: n>1 / best_of forks, beam search, prompt logprobs, logits processing."""

from __future__ import annotations

import functools
import json
import shutil
from collections import Counter

import pytest
import torch

from kvserve import LLM, BeamSearchParams, SamplingParams
from kvserve.engine.model_runner import _banned_by_bad_words
from kvserve.engine.sequence import Sequence, SequenceStatus
from kvserve.layers.sampler import Sampler, SamplingInputs, _apply_bias_and_allowed, _apply_penalties
from oracle import random_prompts

K = 4


@pytest.fixture(scope="module")
def llm(tiny_llama):
    """Prefix caching off: the only sharing is the forks'."""
    return LLM(str(tiny_llama), dtype="float32", kv_cache_memory_bytes=16 << 20, enable_prefix_caching=False)


def _independent(llm: LLM, prompt: list[int], params: SamplingParams, count: int) -> list:
    """`count` unshared runs, output i with seed + i, one at a time."""
    outs = []
    for i in range(count):
        single = SamplingParams(**{**_fields(params), "n": 1, "best_of": None, "seed": params.seed_for_output(i)})
        outs.append(llm.generate(prompt_token_ids=[prompt], sampling_params=single, use_tqdm=False)[0].outputs[0])
    return outs


def _fields(params: SamplingParams) -> dict:
    return {k: v for k, v in params.__dict__.items() if k != "stop_list"}


# ---- parallel sampling -------------------------------------------------------------


def test_forks_share_the_prompt_and_equal_independent_seeded_runs(llm):
    engine = llm.llm_engine
    bm = engine.scheduler.block_manager
    prompt = random_prompts([37], seed=1)[0]  # 2 full blocks of 16 and a last block holding 5 tokens
    params = SamplingParams(n=K, temperature=0.9, top_p=0.95, seed=11, max_tokens=14, ignore_eos=True, logprobs=2)
    copies: list[tuple[int, int]] = []
    runner = engine.executor.worker.runner
    copy_blocks = runner.copy_blocks
    runner.copy_blocks = lambda c: (copies.extend(c), copy_blocks(c))
    try:
        engine.add_request("fork", prompt, params)
        outs = engine.step()  # the prefill: one sequence, then K outputs from its logits
        assert len(outs) == 1 and len(outs[0].outputs) == K
        group = [s for s in engine.scheduler.running if s.request_id == "fork"]
        tables = [bm.block_table(s.seq_id) for s in group]
        assert len(group) == K and all(t == tables[0] for t in tables)
        assert [bm.blocks[b].ref_count for b in tables[0]] == [K, K, K]
        assert bm.num_free_blocks == bm.num_blocks - 3  # the prompt is stored once
        engine.step()  # each output writes its second token into the shared, partly full block
        assert len(copies) == K - 1
        tables = [bm.block_table(s.seq_id) for s in group]
        assert [bm.blocks[b].ref_count for b in tables[0][:2]] == [K, K]
        assert len({t[2] for t in tables}) == K
        final = None
        while engine.has_unfinished_requests():
            final = engine.step()[-1]
    finally:
        runner.copy_blocks = copy_blocks
    assert final.finished and [c.index for c in final.outputs] == list(range(K))
    for forked, alone in zip(final.outputs, _independent(llm, prompt, params, K)):
        assert forked.token_ids == alone.token_ids
        assert forked.text == alone.text
        assert forked.cumulative_logprob == pytest.approx(alone.cumulative_logprob, abs=1e-4)
        assert [sorted(step) for step in forked.logprobs] == [sorted(step) for step in alone.logprobs]
    assert len({tuple(c.token_ids) for c in final.outputs}) == K


def test_streamed_outputs_of_a_group_add_up(llm):
    engine = llm.llm_engine
    engine.add_request("stream", random_prompts([9], seed=2)[0], SamplingParams(n=3, seed=5, max_tokens=10, ignore_eos=True))
    pieces: list[list[str]] = [[], [], []]
    final = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert len(out.outputs) == len(out.new_text) == 3
            for i, text in enumerate(out.new_text):
                pieces[i].append(text)
            final = out
    assert ["".join(p) for p in pieces] == [c.text for c in final.outputs]


def test_forked_sequences_survive_preemption(tiny_llama):
    small = LLM(str(tiny_llama), dtype="float32", block_size=4, num_gpu_blocks_override=16, enable_prefix_caching=False)
    prompt = random_prompts([14], seed=3)[0]
    params = SamplingParams(n=K, temperature=1.0, seed=21, max_tokens=16, ignore_eos=True)
    forked = small.generate(prompt_token_ids=[prompt], sampling_params=params, use_tqdm=False)[0].outputs
    assert small.llm_engine.stats().num_preemptions > 0  # 4 x 30 tokens need 23 of the 16 blocks even shared
    assert [c.token_ids for c in forked] == [c.token_ids for c in _independent(small, prompt, params, K)]
    assert small.llm_engine.stats().num_free_blocks == 16


def test_aborting_a_group_frees_every_sequence(llm):
    engine = llm.llm_engine
    prompt = random_prompts([25], seed=10)[0]
    engine.add_request("group", prompt, SamplingParams(n=3, max_tokens=50, ignore_eos=True))
    engine.add_request("beams", prompt, BeamSearchParams(beam_width=3, max_tokens=50, ignore_eos=True))
    for _ in range(4):
        engine.step()
    assert len(engine.scheduler.running) == 6
    engine.abort_request("group")
    engine.abort_request("beams")  # the autouse fixture checks that every block came back


def test_best_of_keeps_the_most_likely_outputs(llm):
    engine = llm.llm_engine
    prompt = random_prompts([20], seed=4)[0]
    params = SamplingParams(n=2, best_of=5, seed=3, max_tokens=8, ignore_eos=True)
    engine.add_request("best", prompt, params)
    reported = []
    while engine.has_unfinished_requests():
        reported += engine.step()
    assert len(reported) == 1 and reported[0].finished  # the winners are known only at the end
    best = sorted(_independent(llm, prompt, params, 5), key=lambda c: -c.cumulative_logprob)[:2]
    assert [c.token_ids for c in reported[0].outputs] == [c.token_ids for c in best]
    assert [c.index for c in reported[0].outputs] == [0, 1]


# ---- beam search -------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _hf_model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def hf_beam_search(model_dir, prompt: list[int], params: BeamSearchParams, eos_ids: list[int]) -> list[tuple[list[int], float]]:
    """transformers' beams for `params`: (generated tokens up to and including EOS, sequence score), best first."""
    with torch.no_grad():
        out = _hf_model(model_dir).generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False,
            num_beams=params.beam_width,
            num_return_sequences=params.beam_width,
            max_new_tokens=params.max_tokens,
            length_penalty=params.length_penalty,
            early_stopping=params.early_stopping,
            eos_token_id=None if params.ignore_eos else eos_ids,
            pad_token_id=0,
            output_scores=True,
            return_dict_in_generate=True,
        )
    beams = []
    for seq, score in zip(out.sequences[:, len(prompt) :].tolist(), out.sequences_scores.tolist()):
        ends = [i for i, t in enumerate(seq) if t in eos_ids] if not params.ignore_eos else []
        beams.append((seq[: ends[0] + 1] if ends else seq, score))
    return beams


def assert_beams_match(llm: LLM, model_dir, prompts: list[list[int]], params: BeamSearchParams) -> list[str]:
    eos = sorted(llm.llm_engine.eos_token_ids)
    ours = llm.beam_search(prompts, params)
    reasons = []
    for prompt, out in zip(prompts, ours):
        theirs = hf_beam_search(model_dir, prompt, params, eos)
        assert [b.output_token_ids for b in out.sequences] == [t for t, _ in theirs]
        for beam, (_, score) in zip(out.sequences, theirs):
            # fp32 summation order differs from transformers'; scores with length_penalty -1 reach ~300
            assert beam.score == pytest.approx(score, rel=1e-6, abs=1e-4)
            assert beam.tokens[: len(prompt)] == prompt
            reasons.append(beam.finish_reason)
    return reasons


@pytest.mark.parametrize("name, width", [("llama-gqa7-tied", 2), ("qwen2", 4), ("gpt2", 3)])
def test_beam_search_matches_transformers(name, width, tiny_model_dirs):
    llm = LLM(str(tiny_model_dirs[name]), dtype="float32", kv_cache_memory_bytes=16 << 20, block_size=4)
    params = BeamSearchParams(beam_width=width, max_tokens=12, ignore_eos=True)
    assert set(assert_beams_match(llm, tiny_model_dirs[name], random_prompts([6, 23], seed=5), params)) == {"length"}
    assert llm.llm_engine.stats().num_free_blocks == llm.llm_engine.stats().num_blocks


@pytest.fixture(scope="module")
def eos_heavy_model(tiny_llama, tmp_path_factory):
    """The tiny Llama with a token it often predicts declared as EOS, so that beams finish early."""
    directory = tmp_path_factory.mktemp("eos-heavy") / "model"
    shutil.copytree(tiny_llama, directory)
    for name in ("config.json", "generation_config.json"):
        path = directory / name
        config = json.loads(path.read_text())
        config["eos_token_id"] = 303
        path.write_text(json.dumps(config))
    return directory


@pytest.mark.parametrize(
    "width, length_penalty, early_stopping, eos_wins",
    [(3, 1.0, False, False), (4, 2.0, True, True), (2, 0.5, "never", True), (3, -1.0, "never", True), (4, 0.0, False, True)],
)
def test_beam_search_with_eos_matches_transformers(width, length_penalty, early_stopping, eos_wins, eos_heavy_model):
    llm = LLM(str(eos_heavy_model), dtype="float32", kv_cache_memory_bytes=16 << 20, block_size=4)
    params = BeamSearchParams(beam_width=width, max_tokens=14, length_penalty=length_penalty, early_stopping=early_stopping)
    reasons = assert_beams_match(llm, eos_heavy_model, random_prompts([7, 20, 33], seed=21), params)
    assert ("stop" in reasons) == eos_wins  # some returned beams ended at EOS


def test_beam_search_matches_transformers_on_stories(stories_dir):
    llm = LLM(str(stories_dir), dtype="float32", kv_cache_memory_bytes=8 << 20, block_size=4)
    tokenizer = llm.get_tokenizer()
    prompts = [tokenizer(p).input_ids for p in ["Once upon a time", "The cat sat on the mat and"]]
    assert_beams_match(llm, stories_dir, prompts, BeamSearchParams(beam_width=4, max_tokens=20, length_penalty=0.8))


def test_pruned_beams_free_their_blocks_at_once(llm):
    engine = llm.llm_engine
    bm = engine.scheduler.block_manager
    engine.add_request("beam", random_prompts([30], seed=6)[0], BeamSearchParams(beam_width=4, max_tokens=24, ignore_eos=True))
    search = engine.requests["beam"].beam
    seen_beams: dict[int, object] = {}
    forks = 0
    while engine.has_unfinished_requests():
        engine.step()
        live = [s for s in engine.scheduler.running if s.request_id == "beam"]
        for seq in search.beams:
            forks += seq.seq_id not in seen_beams
            seen_beams.setdefault(seq.seq_id, seq)
        owners = Counter(b for s in live for b in bm.block_table(s.seq_id))
        assert all(bm.blocks[b].ref_count == n for b, n in owners.items())
        assert bm.num_free_blocks == bm.num_blocks - len(owners)
        for seq in seen_beams.values():
            if seq.status == SequenceStatus.FINISHED:
                assert bm.block_table(seq.seq_id) == []
    pruned = [s for s in seen_beams.values() if s.finish_reason == "pruned"]
    assert forks > 4 and pruned


def test_beam_search_survives_a_cache_smaller_than_its_beams(llm, tiny_llama):
    """4 beams of up to 38 tokens need about 25 blocks of 4; with 10, beams are preempted while they wait."""
    prompts = random_prompts([14, 22], seed=3)
    params = BeamSearchParams(beam_width=4, max_tokens=16, ignore_eos=True)
    reference = llm.beam_search(prompts, params)
    small = LLM(str(tiny_llama), dtype="float32", block_size=4, num_gpu_blocks_override=10, max_num_batched_tokens=8)
    out = small.beam_search(prompts, params)
    assert small.llm_engine.stats().num_preemptions > 0
    assert [[b.tokens for b in o.sequences] for o in out] == [[b.tokens for b in o.sequences] for o in reference]
    assert small.llm_engine.stats().num_free_blocks == 10


def test_beam_width_one_is_greedy(llm):
    prompt = random_prompts([11], seed=7)[0]
    greedy = llm.generate(prompt_token_ids=[prompt], sampling_params=SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), use_tqdm=False)
    beam = llm.beam_search([prompt], BeamSearchParams(beam_width=1, max_tokens=10, ignore_eos=True))
    assert beam[0].sequences[0].output_token_ids == greedy[0].outputs[0].token_ids


# ---- logprobs and logits processing ---------------------------------------------


def test_prompt_logprobs_agree_with_log_softmax(tiny_llama):
    from transformers import AutoModelForCausalLM

    chunked = LLM(str(tiny_llama), dtype="float32", kv_cache_memory_bytes=16 << 20, max_num_batched_tokens=16)
    prompt = random_prompts([45], seed=8)[0]
    params = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=3, ignore_eos=True)
    first = chunked.generate(prompt_token_ids=[prompt], sampling_params=params, use_tqdm=False)[0]
    again = chunked.generate(prompt_token_ids=[prompt], sampling_params=params, use_tqdm=False)[0]  # prefix cached: recomputed
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([prompt])).logits[0], dim=-1)
    for out in (first, again):
        entries = out.prompt_logprobs
        assert len(entries) == len(prompt) and entries[0] is None
        for j in range(1, len(prompt)):
            row, token, entry = ref[j - 1], prompt[j], entries[j]
            assert token in entry and abs(entry[token].logprob - row[token].item()) < 1e-4
            assert entry[token].rank == int((row > row[token]).sum()) + 1
            top = row.topk(3).indices.tolist()
            assert sorted(entry) == sorted(set(top) | {token})
            assert [entry[t].rank for t in top] == [1, 2, 3]
            for t, lp in entry.items():
                assert abs(lp.logprob - row[t].item()) < 1e-4


def _rows(params: list[SamplingParams], history: list[list[int]], num_prompt: list[int]) -> SamplingInputs:
    n = len(params)
    return SamplingInputs(params, [None] * n, history, num_prompt, [[] for _ in range(n)])


def test_logits_processing_matches_transformers_processors():
    """One batch, a different processor per row, each row checked against transformers' own processor."""
    from transformers.generation.logits_process import (
        MinNewTokensLengthLogitsProcessor,
        NoBadWordsLogitsProcessor,
        PrefixConstrainedLogitsProcessor,
        RepetitionPenaltyLogitsProcessor,
        SequenceBiasLogitsProcessor,
    )

    torch.manual_seed(0)
    vocab = 32
    logits = torch.randn(4, vocab)
    logits[3, [13, 17, 21, 1]] = torch.tensor([10.0, 9.0, 8.0, 7.0])  # so that each ban below changes the choice
    history = [[3, 4, 4, 9], [1, 2, 5], [7, 7, 8, 1], [2, 6]]
    params = [
        SamplingParams(logit_bias={4: 3.5, 30: -100.0}),
        SamplingParams(allowed_token_ids=[2, 5, 11]),
        SamplingParams(repetition_penalty=1.7, presence_penalty=0.4),
        SamplingParams(),
    ]
    out = _apply_penalties(logits.clone(), _rows(params, history, [2, 1, 2, 2]))
    out = _apply_bias_and_allowed(out, params)

    ids = [torch.tensor([h]) for h in history]
    expect0 = SequenceBiasLogitsProcessor({(4,): 3.5, (30,): -100.0})(ids[0], logits[:1].clone())
    expect1 = PrefixConstrainedLogitsProcessor(lambda batch, seq: [2, 5, 11], num_beams=1)(ids[1], logits[1:2].clone())
    expect2 = RepetitionPenaltyLogitsProcessor(1.7)(ids[2], logits[2:3].clone())
    expect2[0, [8, 1]] -= 0.4  # presence: the output tokens (8, 1) once each
    assert torch.allclose(out[0], expect0[0]) and torch.equal(out[1].isinf(), expect1[0].isinf())
    assert torch.allclose(out[1][~out[1].isinf()], expect1[0][~expect1[0].isinf()])
    assert torch.allclose(out[2], expect2[0]) and torch.equal(out[3], logits[3])

    # bad words and min_tokens act through forbidden-token lists; compare the sampler's greedy choice
    seq = Sequence("r", history[3][:1], SamplingParams())
    seq.append_token(history[3][1])  # the output so far: [6]
    seq.bad_words_token_ids = [[6, 13], [21], [5, 13]]
    banned = _banned_by_bad_words(seq)
    assert sorted(banned) == [13, 21]
    bad = NoBadWordsLogitsProcessor([[6, 13], [21], [5, 13]], eos_token_id=1)(ids[3], logits[3:4].clone())
    min_new = MinNewTokensLengthLogitsProcessor(2, min_new_tokens=5, eos_token_id=[13, 17])(ids[3], logits[3:4].clone())
    sampler = Sampler(seed=0)
    greedy = SamplingParams(temperature=0)
    for banned_ids, stop_ids, expected in [(banned, [], bad), ([], [13, 17], min_new)]:
        inputs = SamplingInputs([greedy], [None], [history[3]], [2], [stop_ids], [banned_ids])
        assert sampler(logits[3:4].clone(), inputs).token_ids == [int(expected.argmax())] != [13]


def test_bad_words_and_logit_bias_steer_generation(llm):
    prompt = random_prompts([12], seed=9)[0]
    base = llm.generate(prompt_token_ids=[prompt], sampling_params=SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)[0].outputs[0]
    tokenizer = llm.get_tokenizer()
    round_trips = [t for t, _ in Counter(base.token_ids).most_common() if tokenizer.encode(tokenizer.decode([t]), add_special_tokens=False) == [t]]
    favourite = round_trips[0]
    word = tokenizer.decode([favourite])
    banned = llm.generate(prompt_token_ids=[prompt], sampling_params=SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, bad_words=[word]), use_tqdm=False)[0].outputs[0]
    assert favourite not in banned.token_ids
    forced = llm.generate(prompt_token_ids=[prompt], sampling_params=SamplingParams(temperature=0.8, seed=1, max_tokens=6, ignore_eos=True, logit_bias={77: 100}), use_tqdm=False)[0].outputs[0]
    assert forced.token_ids == [77] * 6
    only = llm.generate(prompt_token_ids=[prompt], sampling_params=SamplingParams(seed=2, max_tokens=20, ignore_eos=True, allowed_token_ids=[5, 6, 7]), use_tqdm=False)[0].outputs[0]
    assert set(only.token_ids) <= {5, 6, 7}


# ---- bad input ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(n=0), "n"), (dict(n=2, best_of=1), "best_of"), (dict(logprobs=21), "logprobs"),
        (dict(prompt_logprobs=-1), "prompt_logprobs"), (dict(repetition_penalty=2.5), "repetition_penalty"),
        (dict(frequency_penalty=-3), "frequency_penalty"), (dict(logit_bias={5: 101}), "logit_bias"),
        (dict(logit_bias={-1: 1}), "logit_bias"), (dict(allowed_token_ids=[]), "allowed_token_ids"),
        (dict(bad_words=[" "]), "bad_words"),
    ],
)
def test_invalid_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field} must be"):
        SamplingParams(**kwargs)


@pytest.mark.parametrize(
    "kwargs, field",
    [(dict(beam_width=0), "beam_width"), (dict(max_tokens=0), "max_tokens"), (dict(length_penalty=float("nan")), "length_penalty"),
     (dict(early_stopping="sometimes"), "early_stopping")],
)
def test_invalid_beam_search_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field} must be"):
        BeamSearchParams(**{"beam_width": 2, "max_tokens": 4, **kwargs})


def test_engine_rejects_what_the_model_cannot_do(llm):
    engine = llm.llm_engine
    too_many = engine.config.max_num_seqs + 1
    with pytest.raises(ValueError, match="best_of must be <= max_num_seqs"):
        engine.add_request("x", [5, 6], SamplingParams(n=too_many))
    with pytest.raises(ValueError, match="beam_width must be <= max_num_seqs"):
        engine.add_request("x", [5, 6], BeamSearchParams(beam_width=too_many, max_tokens=3))
    with pytest.raises(ValueError, match=r"logit_bias token ids must be in \[0, 511\]"):
        engine.add_request("x", [5, 6], SamplingParams(logit_bias={512: 1.0}))
    with pytest.raises(ValueError, match="allowed_token_ids"):
        engine.add_request("x", [5, 6], SamplingParams(allowed_token_ids=[1, 9999]))
    assert not engine.has_unfinished_requests()
