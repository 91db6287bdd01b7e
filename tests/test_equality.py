"""kvserve greedy decoding equals transformers', for every architecture and every scheduling feature."""

from __future__ import annotations

import pytest

from kvserve import LLM
from oracle import PROMPT_LENGTHS, assert_greedy_matches, hf_greedy, kvserve_greedy, random_prompts
from conftest import TINY_MODELS

NEW_TOKENS = 32


@pytest.fixture(scope="module")
def hf_reference(tiny_model_dirs):
    cache = {}

    def get(name: str, prompts_key: str, prompts: list[list[int]]):
        key = (name, prompts_key)
        if key not in cache:
            cache[key] = hf_greedy(tiny_model_dirs[name], prompts, NEW_TOKENS)
        return cache[key]

    return get


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_architectures_match_transformers(name, tiny_model_dirs, hf_reference):
    prompts = random_prompts(PROMPT_LENGTHS)
    llm = LLM(str(tiny_model_dirs[name]), dtype="float32", kv_cache_memory_bytes=64 << 20)
    free_before = llm.llm_engine.stats().num_free_blocks
    ours = kvserve_greedy(llm, prompts, NEW_TOKENS)
    exact = assert_greedy_matches(ours, hf_reference(name, "default", prompts))
    assert exact >= len(prompts) - 1
    assert llm.llm_engine.stats().num_free_blocks == free_before


@pytest.mark.parametrize("block_size", [1, 16])
def test_block_sizes(block_size, tiny_model_dirs, hf_reference):
    prompts = random_prompts(PROMPT_LENGTHS)
    llm = LLM(str(tiny_model_dirs["llama-gqa7-tied"]), dtype="float32", block_size=block_size, kv_cache_memory_bytes=64 << 20)
    assert_greedy_matches(kvserve_greedy(llm, prompts, NEW_TOKENS), hf_reference("llama-gqa7-tied", "default", prompts))


def test_preemption_keeps_tokens(tiny_model_dirs, hf_reference):
    prompts = random_prompts([14, 15, 30, 31, 12, 47, 9, 16], seed=3)
    # the prompts fit in 12 of the 14 blocks, but growing by 32 tokens each needs about 25: preemption must happen
    llm = LLM(str(tiny_model_dirs["qwen2"]), dtype="float32", num_gpu_blocks_override=14, enable_prefix_caching=False)
    engine = llm.llm_engine
    ours = kvserve_greedy(llm, prompts, NEW_TOKENS)
    assert engine.stats().num_preemptions > 0
    assert_greedy_matches(ours, hf_reference("qwen2", "preempt", prompts))
    assert engine.stats().num_free_blocks == 14


def test_prefix_caching_hits_and_matches(tiny_model_dirs, hf_reference):
    shared = random_prompts([70], seed=5)[0]
    tails = random_prompts([1, 5, 20, 33], seed=6)
    prompts = [shared + t for t in tails]
    llm = LLM(str(tiny_model_dirs["llama-mha-hd80"]), dtype="float32", kv_cache_memory_bytes=64 << 20)
    engine = llm.llm_engine
    first = kvserve_greedy(llm, prompts[:1], NEW_TOKENS)
    rest = kvserve_greedy(llm, prompts[1:], NEW_TOKENS)
    assert engine.stats().prefix_cache_hits >= 3 * 64  # 4 full blocks of the shared prefix, for 3 prompts
    assert_greedy_matches(first + rest, hf_reference("llama-mha-hd80", "shared", prompts))
    # the same prompts again are served from the cache entirely (up to the last token) and still match
    again = kvserve_greedy(llm, prompts, NEW_TOKENS)
    assert_greedy_matches(again, hf_reference("llama-mha-hd80", "shared", prompts))


def test_chunked_prefill_small_budget(tiny_model_dirs, hf_reference):
    prompts = random_prompts(PROMPT_LENGTHS)
    llm = LLM(str(tiny_model_dirs["qwen3"]), dtype="float32", max_num_batched_tokens=16, kv_cache_memory_bytes=64 << 20)
    engine = llm.llm_engine
    steps_with_mixed = 0
    original_step = engine.step

    def counting_step():
        nonlocal steps_with_mixed
        outs = original_step()
        stats = engine.last_step
        if 0 < stats.num_prefill_tokens < stats.num_tokens:
            steps_with_mixed += 1
        assert stats.num_tokens <= 16
        return outs

    engine.step = counting_step
    assert_greedy_matches(kvserve_greedy(llm, prompts, NEW_TOKENS), hf_reference("qwen3", "default", prompts))
    assert steps_with_mixed > 0  # prompt chunks shared steps with decodes


def test_all_features_at_once(tiny_model_dirs, hf_reference):
    prompts = random_prompts(PROMPT_LENGTHS)
    llm = LLM(
        str(tiny_model_dirs["llama-headdim-llama3rope"]), dtype="float32", block_size=4,
        num_gpu_blocks_override=150, max_num_batched_tokens=24, enable_prefix_caching=True,
    )
    ours = kvserve_greedy(llm, prompts + prompts[:3], NEW_TOKENS)
    assert llm.llm_engine.stats().num_preemptions > 0
    ref = hf_reference("llama-headdim-llama3rope", "default", prompts)
    assert_greedy_matches(ours, ref + ref[:3])
    assert llm.llm_engine.stats().num_free_blocks == 150


def test_reference_attention_backend_matches_too(tiny_model_dirs, hf_reference):
    prompts = random_prompts(PROMPT_LENGTHS)
    llm = LLM(str(tiny_model_dirs["llama-gqa7-tied"]), dtype="float32", attention_backend="reference", max_num_batched_tokens=32, kv_cache_memory_bytes=64 << 20)
    assert_greedy_matches(kvserve_greedy(llm, prompts, NEW_TOKENS), hf_reference("llama-gqa7-tied", "default", prompts))
