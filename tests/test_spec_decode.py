"""Speculative decoding with prompt-lookup proposals: the output is the same as without it.

Greedy output is identical token for token (every tiny architecture, with chunked prefill, preemption and
prefix caching at work), seeded sampling too (the runner replays a seeded generator to the emitted tokens),
unseeded sampling has the target's distribution (chi-square against the exact one from transformers),
stops, max_tokens, penalties and logprobs behave as without speculation, and rejected proposals give their
KV blocks back.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import TINY_MODELS
from kvserve import LLM, SamplingParams
from spec_decode_utils import PROMPTS, assert_pairs_fit, assert_pool_back, exact_pairs, generate
from kvserve.config import EngineConfig
from kvserve.engine_args import add_engine_arguments, engine_config_from_args
from kvserve.spec_decode import speculator as speculator_module
from kvserve.spec_decode.config import SpeculativeConfig
from kvserve.spec_decode.ngram_proposer import propose_ngram

# max_batch_size 8: these tests batch their prompts (the default, 1, speculates for single streams only)
NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "max_batch_size": 8}


def _pair(model_dir, **kwargs) -> tuple[LLM, LLM]:
    common = dict(dtype="float32", kv_cache_memory_bytes=1 << 23, **kwargs)
    return LLM(str(model_dir), **common), LLM(str(model_dir), speculative_config=NGRAM, **common)




# ---- the proposer and the config ------------------------------------------------------------------


def test_ngram_proposes_what_followed_the_latest_earlier_match():
    assert propose_ngram([1, 2, 3, 4, 5, 1, 2, 3], 3, 1, 4) == [4, 5, 1]  # suffix 1 2 3 seen at 0
    assert propose_ngram([1, 2, 9, 2, 7, 2], 2, 1, 3) == [7, 2]  # suffix 2: its latest earlier match, at 3
    assert propose_ngram([8, 1, 2, 5, 1, 2, 6, 1, 2], 5, 2, 2) == [6, 1, 2]  # at most what follows it
    assert propose_ngram([1, 2, 3, 4], 3, 1, 4) == []
    assert propose_ngram([3, 1, 2, 3], 2, 2, 2) == []  # suffix 2 3 occurs only as itself
    assert propose_ngram([7], 3, 1, 2) == []


def test_config_parses_vllm_json_and_names_bad_fields():
    config = EngineConfig(speculative_config=json.dumps(NGRAM))
    assert config.speculative_config == SpeculativeConfig(num_speculative_tokens=4, prompt_lookup_max=3, max_batch_size=8)
    with pytest.raises(ValueError, match="speculative_config.method must be one of ngram, draft_model"):
        SpeculativeConfig.parse({"method": "eagle"})
    with pytest.raises(ValueError, match="unknown key"):
        SpeculativeConfig.parse({"method": "ngram", "num_tokens": 3})
    with pytest.raises(ValueError, match=r"num_speculative_tokens must be an integer in \[1, 32\]"):
        SpeculativeConfig.parse({"num_speculative_tokens": 0})
    with pytest.raises(ValueError, match=r"prompt_lookup_max must be an integer in \[3, 64\]"):
        SpeculativeConfig.parse({"prompt_lookup_min": 3, "prompt_lookup_max": 2})
    with pytest.raises(ValueError, match="must be a JSON object"):
        SpeculativeConfig.parse("{ngram")
    import argparse

    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    args = parser.parse_args(["--speculative-config", '{"method": "ngram", "num_speculative_tokens": 3}'])
    assert engine_config_from_args(args).speculative_config.num_speculative_tokens == 3


# ---- exactness ------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", list(TINY_MODELS))
def test_greedy_identical_on_every_architecture(arch, tiny_model_dirs):
    """Chunks of 32 tokens (a prompt spans steps), a pool of 12 blocks for 4 sequences of ~70 tokens
    (preemptions), and shared prompts (prefix-cache hits)."""
    prompts = PROMPTS + [PROMPTS[0] + [1, 2]]
    base, spec = _pair(tiny_model_dirs[arch], max_num_batched_tokens=32, num_gpu_blocks_override=12)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    expected = generate(base, params, prompts)
    got = generate(spec, params, prompts)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in expected]
    stats = spec.llm_engine.stats()
    assert stats.spec_decode.num_accepted_tokens > 0 and stats.spec_decode.num_draft_tokens > stats.spec_decode.num_accepted_tokens
    assert stats.num_preemptions > 0 and stats.prefix_cache_hits > 0
    assert_pool_back(spec)


def test_seeded_sampling_logprobs_and_penalties_identical(tiny_llama):
    """A seeded request draws the same numbers: after a rejection the runner sets its generator back to
    where the emitted tokens alone leave it. Logprobs (top 3) and penalties see the same histories."""
    base, spec = _pair(tiny_llama)
    for params in (
        SamplingParams(temperature=0.8, top_p=0.9, seed=11, max_tokens=30, ignore_eos=True, logprobs=3),
        SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, repetition_penalty=1.3, presence_penalty=0.4),
        SamplingParams(temperature=1.0, seed=5, n=2, max_tokens=20, ignore_eos=True, frequency_penalty=0.5),
    ):
        expected, got = generate(base, params), generate(spec, params)
        for e, g in zip(expected, got):
            for eo, go in zip(e.outputs, g.outputs):
                assert go.token_ids == eo.token_ids
                assert go.cumulative_logprob == pytest.approx(eo.cumulative_logprob, abs=1e-3)
                if eo.logprobs is not None:
                    assert [sorted(entry) for entry in go.logprobs] == [sorted(entry) for entry in eo.logprobs]
    assert spec.llm_engine.stats().spec_decode.num_accepted_tokens > 0
    assert_pool_back(spec)


def test_stops_and_max_tokens_as_without_speculation(tiny_llama):
    """A stop token or stop string met inside a run of accepted proposals ends the output at the same token;
    max_tokens is never exceeded."""
    base, spec = _pair(tiny_llama)
    free = generate(base, SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True))
    tokens = free[0].outputs[0].token_ids
    stop_token = tokens[17]
    stop_text = free[0].outputs[0].text[40:43]
    for params in (
        SamplingParams(temperature=0.0, max_tokens=30, stop_token_ids=[stop_token]),
        SamplingParams(temperature=0.0, max_tokens=30, stop=[stop_text], ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=30, stop=[stop_text], include_stop_str_in_output=True, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=7, ignore_eos=True),
    ):
        expected, got = generate(base, params), generate(spec, params)
        for e, g in zip(expected, got):
            eo, go = e.outputs[0], g.outputs[0]
            assert (go.token_ids, go.text, go.finish_reason, go.stop_reason) == (eo.token_ids, eo.text, eo.finish_reason, eo.stop_reason)
            assert go.cumulative_logprob == pytest.approx(eo.cumulative_logprob, abs=1e-3)
    assert_pool_back(spec)


def test_first_verified_token_has_the_target_distribution(tiny_llama):
    """Unseeded sampling (top_k 4), 1,200 times: the second is always verified against a
    proposal (the prompt holds each of the four first tokens, so the first always has an earlier match). The
    pairs' counts fit the exact distribution from transformers (chi-square, p > 0.001)."""
    prompt = torch.randperm(512, generator=torch.Generator().manual_seed(0)).tolist()[:480]
    expected = exact_pairs(tiny_llama, prompt)
    assert {t1 for t1, _ in expected} <= set(prompt[:-1])
    spec = LLM(str(tiny_llama), dtype="float32", max_num_seqs=400, kv_cache_memory_bytes=1 << 24,
               speculative_config={**NGRAM, "max_batch_size": 1024, "min_acceptance_rate": 0.0})
    n = 1200
    outs = spec.generate([{"prompt_token_ids": prompt}] * n, SamplingParams(temperature=1.0, top_k=4, max_tokens=3, ignore_eos=True),
                         use_tqdm=False)  # max_tokens 3: room for one proposal after the first token
    assert spec.llm_engine.stats().spec_decode.num_drafts >= n * 0.99
    assert_pairs_fit(outs, expected)
    assert_pool_back(spec)


# ---- rejections, blocks, adaptivity --------------------------------------------------------------


def test_wrong_proposals_change_nothing_and_leak_no_block(tiny_llama, monkeypatch):
    """A proposer that is always wrong: identical greedy output, every proposal rejected, each step's extra
    blocks given back (checked after every step), and the sequence pauses its proposals."""
    base, spec = _pair(tiny_llama, block_size=4)
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    expected = generate(base, params, PROMPTS[:1])[0].outputs[0].token_ids
    monkeypatch.setattr(speculator_module, "propose_ngram", lambda tokens, k, *_: [(tokens[-1] + 1 + i) % 512 for i in range(k)])
    engine = spec.llm_engine
    engine.add_request("wrong", PROMPTS[0], params)
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
        held = {b for seq in engine.scheduler.running for b in engine.scheduler.block_manager.held_blocks(seq.seq_id)}
        for seq in engine.scheduler.running:
            assert len(engine.scheduler.block_manager.block_table(seq.seq_id)) == -(-seq.num_computed_tokens // 4)
        assert engine.stats().num_free_blocks == engine.stats().num_blocks - len(held)
    assert outputs[-1].outputs[0].token_ids == expected
    stats = engine.stats().spec_decode
    assert stats.num_accepted_tokens == 0 and stats.num_draft_tokens > 0
    assert stats.num_drafts < 29  # paused after the first misses instead of proposing at every step
    assert_pool_back(spec)


def test_no_proposals_in_big_batches(tiny_llama):
    spec = LLM(str(tiny_llama), dtype="float32", kv_cache_memory_bytes=1 << 23, speculative_config={**NGRAM, "max_batch_size": 2})
    generate(spec, SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True), PROMPTS)  # 4 at once
    assert spec.llm_engine.stats().spec_decode.num_drafts == 0
    generate(spec, SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True), PROMPTS[:2])
    assert spec.llm_engine.stats().spec_decode.num_drafts > 0


def test_default_model_greedy_identical_in_float32():
    """The default model (SmolLM2-135M-Instruct) dequantized to fp32. With its Q4_1 blocks (int8 activations)
    or in bf16 the rows of a verification step take the multi-row kernels, whose rounding differs from a
    one-row decode, and a near-tie may flip, exactly as when other requests join the batch (both change
    the same token of this test's first prompt in bf16; docs/PERFORMANCE.md)."""
    text = "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n"
    messages = [[{"role": "user", "content": "Repeat this code exactly:\n\n" + text}],
                [{"role": "user", "content": "What is the capital of France?"}]]
    params = SamplingParams(temperature=0.0, max_tokens=40)
    spec = LLM(dtype="float32", quantization="none", kv_cache_memory_bytes=1 << 26, speculative_config=NGRAM)
    got = [o.outputs[0].token_ids for o in spec.chat(messages, params, use_tqdm=False)]
    stats = spec.llm_engine.stats().spec_decode
    assert stats.mean_acceptance_length > 1.5
    spec.llm_engine.scheduler.speculator = None  # the same engine without speculation (one load of the model, not two)
    assert [o.outputs[0].token_ids for o in spec.chat(messages, params, use_tqdm=False)] == got


def test_counters_reach_stats_and_prometheus(tiny_llama):
    from kvserve.engine.async_engine import IterationStats
    from kvserve.metrics import ServerMetrics

    spec = LLM(str(tiny_llama), dtype="float32", kv_cache_memory_bytes=1 << 23, speculative_config=NGRAM)
    generate(spec, SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))
    stats = spec.llm_engine.stats()
    counts = stats.spec_decode
    assert counts.num_drafts > 0 and 0 < counts.num_accepted_tokens <= counts.num_draft_tokens <= 4 * counts.num_drafts
    assert counts.mean_acceptance_length == pytest.approx(1 + counts.num_accepted_tokens / counts.num_drafts)
    metrics = ServerMetrics("tiny")
    metrics.observe(IterationStats(engine=stats))
    text = metrics.render()[0].decode()
    assert f'kvserve:spec_decode_num_accepted_tokens_total{{model_name="tiny"}} {float(counts.num_accepted_tokens)}' in text
    assert f'kvserve:spec_decode_num_draft_tokens_total{{model_name="tiny"}} {float(counts.num_draft_tokens)}' in text
    # per position: the drafts whose first, second ... proposal was accepted (each also accepted all before it)
    per_position = counts.accepted_per_position
    assert sum(per_position) == counts.num_accepted_tokens and per_position == sorted(per_position, reverse=True)
    assert per_position[0] <= counts.num_drafts and len(per_position) <= 4
    assert (f'kvserve:spec_decode_num_accepted_tokens_per_pos_total{{model_name="tiny",position="0"}} '
            f'{float(per_position[0])}') in text


def test_constrained_outputs_do_not_speculate_beside_free_ones(tiny_llama):
    """A grammar gives one mask per sampled row, so an output under one runs without proposals; in the same batch
    a free output still speculates and keeps its tokens."""
    from kvserve.sampling_params import StructuredOutputsParams

    base, spec = _pair(tiny_llama)
    free = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    choice = SamplingParams(temperature=0.0, max_tokens=24, structured_outputs=StructuredOutputsParams(choice=["yes", "no", "maybe"]))
    expected = generate(base, free, PROMPTS[:1])[0].outputs[0].token_ids
    outs = spec.generate([{"prompt_token_ids": PROMPTS[0]}, {"prompt_token_ids": PROMPTS[1]}], [free, choice], use_tqdm=False)
    assert outs[0].outputs[0].token_ids == expected
    assert outs[1].outputs[0].text in ("yes", "no", "maybe") and outs[1].outputs[0].finish_reason == "stop"
    assert spec.llm_engine.stats().spec_decode.num_accepted_tokens > 0
    assert_pool_back(spec)


def test_server_streams_accepted_runs_as_plain_decoding_does(chat_llama):
    """Through the OpenAI server (official client), with prompt lookup and with a draft model: a step that
    emits several tokens streams them as one delta; the text, the token counts and the finish reason equal a
    server without speculation."""
    import openai

    from server_utils import ServerThread

    results = []
    for spec_config in (None, NGRAM, {"model": str(chat_llama), "num_speculative_tokens": 3}):  # (a draft: itself)
        config = EngineConfig(model=str(chat_llama), dtype="float32", kv_cache_memory_bytes=1 << 23, speculative_config=spec_config)
        server = ServerThread(config, "tiny")
        try:
            client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=60, max_retries=0)
            messages = [{"role": "user", "content": "A B C A B C A B C A B"}]
            full = client.chat.completions.create(model="tiny", messages=messages, max_tokens=40, temperature=0)
            chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=40, temperature=0,
                                                         stream=True, stream_options={"include_usage": True}))
            streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            results.append((full.choices[0].message.content, streamed, full.usage.completion_tokens, chunks[-1].usage.completion_tokens,
                            full.choices[0].finish_reason))
            if spec_config is not None:
                assert server.engine.engine.stats().spec_decode.num_accepted_tokens > 0
        finally:
            server.stop()
    assert results[0] == results[1] == results[2]
    assert results[1][0] == results[1][1]
