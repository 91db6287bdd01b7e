"""Attention sinks (StreamingLLM): decoding equals an explicit sink + window cache with positions within
it, far past the window and the model's length, with every scheduling feature; a sequence's blocks stay
constant however long it grows, and return to the pool."""

from __future__ import annotations

import argparse

import pytest

from kvserve import LLM, SamplingParams
from kvserve.config import EngineConfig
from kvserve.engine_args import add_engine_arguments, engine_config_from_args
from conftest import make_tiny_model
from oracle import assert_greedy_matches, kvserve_greedy, random_prompts
from streaming_reference import streaming_greedy

SINKS, WINDOW = 4, 32
NEW_TOKENS = 300  # several hundred tokens past the window
PROMPTS = random_prompts([5, 90], seed=3)  # one shorter than the window, one longer than sinks + window


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny GQA Llama (2 query heads per kv head) whose context is 512 tokens."""
    return make_tiny_model(tmp_path_factory.mktemp("sinks") / "llama", "llama",
                           dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2))


@pytest.fixture(scope="module")
def reference(model_dir):
    cache: dict = {}

    def get(prompts: list[list[int]], new_tokens: int = NEW_TOKENS, sinks: int = SINKS):
        key = (tuple(map(tuple, prompts)), new_tokens, sinks)
        if key not in cache:
            cache[key] = [streaming_greedy(model_dir, p, new_tokens, sinks, WINDOW) for p in prompts]
        return cache[key]

    return get


def streaming_llm(model_dir, **kwargs) -> LLM:
    options = dict(dtype="float32", attention_sinks=SINKS, sliding_window=WINDOW, block_size=4, kv_cache_memory_bytes=4 << 20)
    options.update(kwargs)
    return LLM(str(model_dir), **options)


def check(llm: LLM, reference, prompts=PROMPTS, new_tokens: int = NEW_TOKENS, sinks: int = SINKS) -> None:
    engine = llm.llm_engine
    free = engine.stats().num_free_blocks
    ours = kvserve_greedy(llm, prompts, new_tokens)
    assert assert_greedy_matches(ours, reference(prompts, new_tokens, sinks)) == len(prompts)
    assert engine.stats().num_free_blocks == free  # every block back, dropped ones included


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("block_size", [1, 16])
def test_equals_an_explicit_sink_and_window_cache(model_dir, reference, backend, block_size):
    check(streaming_llm(model_dir, attention_backend=backend, block_size=block_size), reference)


def test_without_sinks_is_a_window_at_cache_positions(model_dir, reference):
    """Sinks change the tokens (the test above is not a plain window's), and S = 0 streams a plain window."""
    with_sinks, without = reference(PROMPTS), reference(PROMPTS, sinks=0)
    assert any(a[0] != b[0] for a, b in zip(with_sinks, without))
    check(streaming_llm(model_dir, attention_sinks=0), reference, sinks=0)


def test_chunked_prefill_with_a_budget_of_16(model_dir, reference):
    check(streaming_llm(model_dir, max_num_batched_tokens=16), reference)


def test_prefix_cache_hits_and_n_greater_than_one(model_dir, reference):
    """A second run finds the prompts' blocks cached (sink blocks, and the window's, past dropped ones), and
    outputs forked from one prompt (copy-on-write) each stream the same cache."""
    llm = streaming_llm(model_dir)
    check(llm, reference)
    check(llm, reference)
    assert llm.llm_engine.stats().prefix_cache_hits > 0
    outs = llm.generate(prompt_token_ids=PROMPTS[1:], sampling_params=SamplingParams(
        n=3, temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True), use_tqdm=False)
    assert [c.token_ids for c in outs[0].outputs] == [reference(PROMPTS)[1][0]] * 3


def test_preemption_recomputes_the_same_cache(model_dir, reference):
    """Four sequences in 24 blocks of 4 (each needs ~11): preempted ones are recomputed from their tokens, and
    every token's K/V depends on its prefix alone, so they go on exactly where they were."""
    prompts = random_prompts([5, 90, 20, 60], seed=4)
    llm = streaming_llm(model_dir, num_gpu_blocks_override=24, max_num_batched_tokens=16)
    check(llm, reference, prompts, new_tokens=200)
    assert llm.llm_engine.stats().num_preemptions > 0


def test_blocks_stay_constant_far_past_the_window_and_the_model_length(model_dir):
    """10 x W tokens and past max_model_len (512): the sequence holds its sink block and its window's."""
    llm = streaming_llm(model_dir)
    engine = llm.llm_engine
    free = engine.stats().num_free_blocks
    engine.add_request("r", PROMPTS[0], SamplingParams(max_tokens=10 * WINDOW + 300, ignore_eos=True))
    held, output = [], None
    while engine.has_unfinished_requests():
        for output in engine.step():
            pass
        if engine.stats().running:
            held.append(engine.stats().running[0].num_blocks)
    assert len(output.outputs[0].token_ids) == 10 * WINDOW + 300 and output.outputs[0].finish_reason == "length"
    steady = held[SINKS + WINDOW :]
    assert max(held) == 1 + WINDOW // 4 + 1 and min(steady) >= WINDOW // 4  # the sink block + the window's (+ one filling)
    assert engine.stats().num_free_blocks == free


def test_prompts_past_the_model_length_stream_only_in_this_mode(model_dir, reference):
    long_prompt = random_prompts([600], seed=5)
    with pytest.raises(ValueError, match="max_model_len"):
        LLM(str(model_dir), dtype="float32", kv_cache_memory_bytes=4 << 20).generate(prompt_token_ids=long_prompt)
    llm = streaming_llm(model_dir, max_num_batched_tokens=64)
    check(llm, reference, long_prompt, new_tokens=20)


def test_gpt2_streams_past_its_positions(tmp_path):
    """Learned positions: tokens take their cache positions (capped at n_positions), so GPT-2 runs far past its
    64 positions; the CPU kernel agrees with the reference backend."""
    gpt2 = make_tiny_model(tmp_path / "gpt2", "gpt2", dict(n_embd=128, n_head=4, n_layer=2, n_positions=64))
    prompts = random_prompts([5, 70], seed=6)
    results = [kvserve_greedy(streaming_llm(gpt2, attention_backend=backend, max_num_batched_tokens=64), prompts, 300)
               for backend in ("reference", "cpu")]
    assert assert_greedy_matches(*results) == len(prompts)


def test_int8_kv_cache_with_sinks(model_dir):
    """The sinks are read from a quantized cache with their scales: the CPU kernel agrees with the reference."""
    results = [kvserve_greedy(streaming_llm(model_dir, kv_cache_dtype="int8", attention_backend=backend), PROMPTS, 150)
               for backend in ("reference", "cpu")]
    assert assert_greedy_matches(*results) >= len(PROMPTS) - 1


@pytest.mark.parametrize("kwargs, message", [
    (dict(attention_sinks=-1, sliding_window=8), "attention_sinks must be an integer >= 0"),
    (dict(attention_sinks=4), "attention_sinks=4 needs a sliding_window"),
    (dict(sliding_window=0), "sliding_window must be an integer >= 1"),
    (dict(sliding_window=2.5), "sliding_window must be an integer >= 1"),
])
def test_options_are_validated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig(**kwargs)


def test_command_line_flags():
    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    config = engine_config_from_args(parser.parse_args(["--attention-sinks", "4", "--sliding-window", "1024"]))
    assert (config.attention_sinks, config.sliding_window) == (4, 1024)
    assert config.streaming_window.cache_len == 1028
