"""Engine behaviour: seeded sampling, stop conditions, sampling filters, bad input, abort, no block leaks."""

from __future__ import annotations

import pytest
import torch

from kvserve import LLM, SamplingParams
from kvserve.layers.sampler import Sampler, SamplingInputs
from oracle import random_prompts


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(str(tiny_llama), dtype="float32", kv_cache_memory_bytes=32 << 20)


def test_seeded_request_is_independent_of_the_batch(llm):
    params = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=1234, max_tokens=24, ignore_eos=True)
    prompt = random_prompts([12], seed=42)[0]
    alone = llm.generate(prompt_token_ids=[prompt], sampling_params=params, use_tqdm=False)[0].outputs[0]
    others = random_prompts(list(range(3, 63, 3)), seed=9)  # 20 other requests, unseeded and seeded
    other_params = [SamplingParams(temperature=1.0, max_tokens=30, seed=(i if i % 2 else None), ignore_eos=True) for i in range(20)]
    outs = llm.generate(prompt_token_ids=others[:10] + [prompt] + others[10:], sampling_params=other_params[:10] + [params] + other_params[10:], use_tqdm=False)
    in_batch = outs[10].outputs[0]
    assert in_batch.token_ids == alone.token_ids
    assert in_batch.text == alone.text
    unseeded = llm.generate(prompt_token_ids=[prompt], sampling_params=SamplingParams(temperature=0.9, max_tokens=24, ignore_eos=True), use_tqdm=False)
    assert len(unseeded[0].outputs[0].token_ids) == 24


def test_top_k_one_is_greedy_and_temperature_zero_is_deterministic(llm):
    prompts = random_prompts([5, 30], seed=1)
    greedy = llm.generate(prompt_token_ids=prompts, sampling_params=SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    top1 = llm.generate(prompt_token_ids=prompts, sampling_params=SamplingParams(temperature=1.5, top_k=1, max_tokens=16, ignore_eos=True), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in greedy] == [o.outputs[0].token_ids for o in top1]


def test_max_tokens_stop_token_ids_and_eos(llm):
    prompt = random_prompts([10], seed=2)[0]
    base = llm.generate(prompt_token_ids=[prompt], sampling_params=SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert len(base.token_ids) == 20 and base.finish_reason == "length"
    stop_at = base.token_ids[5]
    first = base.token_ids.index(stop_at)
    out = llm.generate(prompt_token_ids=[prompt], sampling_params=SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[stop_at], ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == base.token_ids[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_at


def test_stop_strings_are_cut_from_the_text(llm):
    prompt = random_prompts([10], seed=2)[0]
    base = llm.generate(prompt_token_ids=[prompt], sampling_params=SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), use_tqdm=False)[0].outputs[0]
    text = base.text
    assert len(text) > 6
    stop = text[3:6]
    out = llm.generate(prompt_token_ids=[prompt], sampling_params=SamplingParams(temperature=0, max_tokens=20, stop=[stop], ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert out.text == text[: text.index(stop)]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    kept = llm.generate(prompt_token_ids=[prompt], sampling_params=SamplingParams(temperature=0, max_tokens=20, stop=stop, include_stop_str_in_output=True, ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert kept.text == text[: text.index(stop) + len(stop)]


def test_streamed_deltas_add_up_to_the_text(llm):
    engine = llm.llm_engine
    prompt = random_prompts([8], seed=4)[0]
    engine.add_request("stream", prompt, SamplingParams(temperature=0, max_tokens=25, stop=["zzzz"], ignore_eos=True))
    pieces, final = [], None
    while engine.has_unfinished_requests():
        for out in engine.step():
            pieces.append(out.new_text[0])
            final = out
    assert final.finished and "".join(pieces) == final.outputs[0].text


def test_bad_input_fails_alone(llm):
    engine = llm.llm_engine
    engine.add_request("good", random_prompts([20], seed=3)[0], SamplingParams(temperature=0, max_tokens=8))
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("empty", [], SamplingParams())
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("empty-text", "", SamplingParams())
    too_long = engine.config.max_model_len
    with pytest.raises(ValueError, match=f"{too_long} tokens long.*{too_long}"):
        engine.add_request("long", [5] * too_long, SamplingParams())
    with pytest.raises(ValueError, match="token ids"):
        engine.add_request("oov", [5, 100_000], SamplingParams())
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("good", [5], SamplingParams())
    finished = []
    while engine.has_unfinished_requests():
        finished += [o for o in engine.step() if o.finished]
    assert [o.request_id for o in finished] == ["good"]
    assert len(finished[0].outputs[0].token_ids) == 8


def test_prompt_larger_than_the_cache_is_rejected(tiny_llama):
    small = LLM(str(tiny_llama), dtype="float32", num_gpu_blocks_override=2, block_size=4)
    with pytest.raises(ValueError, match="KV cache holds only 8 tokens"):
        small.generate(prompt_token_ids=[[5] * 9], use_tqdm=False)
    out = small.generate(prompt_token_ids=[[5] * 4], sampling_params=SamplingParams(max_tokens=20, ignore_eos=True), use_tqdm=False)[0]
    assert out.outputs[0].finish_reason == "length" and len(out.outputs[0].token_ids) == 4  # capped at the cache size
    assert small.llm_engine.stats().num_free_blocks == 2


def test_abort_frees_blocks(llm):
    engine = llm.llm_engine
    engine.add_request("a", random_prompts([40], seed=8)[0], SamplingParams(max_tokens=100, ignore_eos=True))
    engine.add_request("b", random_prompts([40], seed=9)[0], SamplingParams(max_tokens=3, ignore_eos=True))
    engine.step()
    engine.step()
    assert engine.stats().num_free_blocks < engine.stats().num_blocks
    engine.abort_request("a")
    while engine.has_unfinished_requests():
        engine.step()


@pytest.mark.parametrize(
    "field, value",
    [("temperature", -1), ("top_p", 0), ("top_p", 1.5), ("top_k", -2), ("min_p", 2), ("max_tokens", 0),
     ("n", 0), ("seed", "x"), ("stop", 3), ("presence_penalty", 3), ("repetition_penalty", 0), ("logprobs", 21),
     ("min_tokens", -1), ("stop_token_ids", [-1])],
)
def test_sampling_params_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def _inputs(params: list[SamplingParams]) -> SamplingInputs:
    n = len(params)
    return SamplingInputs(params, [None] * n, [[] for _ in range(n)], [0] * n, [[] for _ in range(n)])


def test_sampler_filters_follow_their_definitions():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]] * 3))
    params = [SamplingParams(top_k=2), SamplingParams(top_p=0.7), SamplingParams(min_p=0.5)]
    allowed = [{0, 1}, {0, 1}, {0, 1}]
    sampler = Sampler(seed=0)
    seen = [set() for _ in params]
    for _ in range(200):
        for i, t in enumerate(sampler(logits.clone(), _inputs(params)).token_ids):
            seen[i].add(t)
    assert seen == allowed


def test_sampler_draws_match_the_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1])
    logits = torch.log(probs).repeat(4000, 1)
    out = Sampler(seed=1)(logits, _inputs([SamplingParams()] * 4000)).token_ids
    freq = torch.bincount(torch.tensor(out), minlength=3).float() / 4000
    assert torch.allclose(freq, probs, atol=0.03)


def test_penalties_follow_transformers_and_openai():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    from kvserve.layers.sampler import _apply_penalties

    torch.manual_seed(0)
    logits = torch.randn(2, 10)
    history = [[1, 2, 2, 5], [3, 3, 3, 7]]
    params = [SamplingParams(repetition_penalty=1.3), SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)]
    out = _apply_penalties(logits.clone(), SamplingInputs(params, [None, None], history, [2, 1], [[], []]))
    expected0 = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([history[0]]), logits[:1].clone())[0]
    assert torch.allclose(out[0], expected0)
    expected1 = logits[1].clone()
    expected1[3] -= 0.5 + 0.25 * 2  # output tokens are history[1][1:] = [3, 3, 7]
    expected1[7] -= 0.5 + 0.25 * 1
    assert torch.allclose(out[1], expected1)


def test_min_tokens_suppresses_eos(llm):
    engine = llm.llm_engine
    eos = next(iter(engine.eos_token_ids))
    prompt = random_prompts([6], seed=11)[0]
    out = llm.generate(prompt_token_ids=[prompt], sampling_params=SamplingParams(temperature=0, max_tokens=12, min_tokens=12, stop_token_ids=[eos]), use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 12 and eos not in out.token_ids


def test_logprobs_agree_with_log_softmax(llm, tiny_llama):
    from transformers import AutoModelForCausalLM

    prompt = random_prompts([15], seed=12)[0]
    out = llm.generate(prompt_token_ids=[prompt], sampling_params=SamplingParams(temperature=0, max_tokens=4, logprobs=3, ignore_eos=True), use_tqdm=False)[0].outputs[0]
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([prompt + out.token_ids])).logits[0]
    ref = torch.log_softmax(logits, dim=-1)[len(prompt) - 1 : -1]
    total = 0.0
    for step, token in enumerate(out.token_ids):
        entry = out.logprobs[step]
        assert token in entry and entry[token].rank == 1
        top = ref[step].topk(3)
        assert sorted(entry) == sorted(set(top.indices.tolist()) | {token})
        for t, lp in entry.items():
            assert abs(lp.logprob - ref[step, t].item()) < 1e-4
        total += ref[step, token].item()
    assert abs(out.cumulative_logprob - total) < 1e-3


def test_chosen_logprobs_score_the_raw_logits_without_a_full_table():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(3))
    raw = logits.clone()
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0, presence_penalty=1.5),
              SamplingParams(temperature=0, logit_bias={7: 100.0})]
    inputs = SamplingInputs(params, [None] * 3, [[1, 2, 3]] * 3, [1] * 3, [[int(raw[0].argmax())], [], []])
    out = Sampler()(logits, inputs)
    assert out.raw_logprobs is None  # nobody asked for top logprobs or beam scores
    assert torch.equal(logits, raw)  # processing did not write into the caller's logits
    assert out.token_ids[0] != int(raw[0].argmax()) and out.token_ids[2] == 7
    expected = torch.log_softmax(raw, dim=-1)[torch.arange(3), torch.tensor(out.token_ids)]
    torch.testing.assert_close(torch.tensor(out.logprobs), expected)
    assert Sampler()(logits, SamplingInputs(params, [None] * 3, [[1]] * 3, [1] * 3, [[], [], []], full_logprobs=True)).raw_logprobs is not None


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_bf16_logits_sample_as_their_fp32_values(temperature):
    """The model hands the sampler bf16 logits at bf16; greedy rows take argmax and logsumexp from them
    directly, other rows from an fp32 copy: the same tokens and logprobs as the fp32 values give."""
    logits = (torch.randn(4, 300, generator=torch.Generator().manual_seed(5)) * 4).bfloat16()
    logits[1, 17] = logits[1, 250] = logits[1].max() + 1  # a tie: the first index, as torch.argmax
    params = [SamplingParams(temperature=temperature, seed=i) for i in range(4)]
    inputs = SamplingInputs(params, [None] * 4, [[1]] * 4, [1] * 4, [[]] * 4)
    got, want = Sampler(seed=1)(logits, inputs), Sampler(seed=1)(logits.float(), inputs)
    assert got.token_ids == want.token_ids
    assert got.logprobs == pytest.approx(want.logprobs, abs=1e-5)
    if temperature == 0:
        assert got.token_ids[1] == 17
        expected = torch.log_softmax(logits.float(), dim=-1)[torch.arange(4), torch.tensor(got.token_ids)]
        torch.testing.assert_close(torch.tensor(got.logprobs), expected)


def test_last_layer_computes_only_the_rows_whose_logits_are_taken(llm, tiny_llama):
    """A prefill step needs final hidden states only where it samples: every layer attends over all
    prompt tokens (they write K/V), the last one's MLP runs for the sampled rows alone, and the
    greedy tokens are still transformers'."""
    from oracle import assert_greedy_matches, hf_greedy, kvserve_greedy

    layers = llm.llm_engine.executor.worker.model.model.layers
    seen: dict[int, list[int]] = {0: [], len(layers) - 1: []}
    hooks = [
        layers[i].mlp.register_forward_hook(lambda module, args, out, i=i: seen[i].append(args[0].shape[0])) for i in seen
    ]
    prompts = random_prompts([40, 25], seed=1)
    try:
        got = kvserve_greedy(llm, prompts, 4)
    finally:
        for h in hooks:
            h.remove()
    assert seen[0][0] == 65 and seen[len(layers) - 1][0] == 2
    assert_greedy_matches(got, hf_greedy(tiny_llama, prompts, 4))
