"""Sliding-window models run exactly: greedy tokens equal transformers' far past the window, with every
scheduling feature, and a sequence's KV blocks stay bounded by its window when every layer has one."""

from __future__ import annotations

import pytest

from kvserve import LLM
from kvserve.estimate.roofline import sequence_kv_tokens
from conftest import make_tiny_model
from oracle import assert_greedy_matches, hf_greedy, kvserve_greedy, random_prompts

WINDOW = 24  # of the tiny models in conftest.TINY_MODELS ("mistral-sliding", "qwen2-sliding-upper")
PROMPTS = random_prompts([3, 10, 30, 57], seed=11)
NEW_TOKENS = 60  # every sequence ends past the window; the longest is 117 tokens


@pytest.fixture(scope="module")
def model_dirs(tiny_model_dirs, tmp_path_factory) -> dict:
    """The windowed models of conftest, and Qwen2 with a window on every layer (max_window_layers=0)."""
    qwen2_all = make_tiny_model(tmp_path_factory.mktemp("qwen2-sliding-all") / "m", "qwen2", dict(
        hidden_size=128, num_attention_heads=4, num_key_value_heads=1, use_sliding_window=True, sliding_window=WINDOW,
        max_window_layers=0))
    return {"mistral-sliding": tiny_model_dirs["mistral-sliding"], "qwen2-sliding-upper": tiny_model_dirs["qwen2-sliding-upper"],
            "qwen2-sliding-all": qwen2_all}


@pytest.fixture(scope="module")
def reference(model_dirs):
    cache: dict = {}

    def get(name: str, prompts: list[list[int]], new_tokens: int = NEW_TOKENS):
        key = (name, tuple(map(tuple, prompts)), new_tokens)
        if key not in cache:
            cache[key] = hf_greedy(model_dirs[name], prompts, new_tokens)
        return cache[key]

    return get


def _check(llm: LLM, name: str, reference, prompts=PROMPTS, new_tokens: int = NEW_TOKENS) -> None:
    engine = llm.llm_engine
    free = engine.stats().num_free_blocks
    ours = kvserve_greedy(llm, prompts, new_tokens)
    assert assert_greedy_matches(ours, reference(name, prompts, new_tokens)) >= len(prompts) - 1
    assert engine.stats().num_free_blocks == free  # no block leaks, dropped ones included


@pytest.mark.parametrize("name", ["mistral-sliding", "qwen2-sliding-all", "qwen2-sliding-upper"])
@pytest.mark.parametrize("block_size", [1, 16])
def test_block_sizes(model_dirs, reference, name, block_size):
    llm = LLM(str(model_dirs[name]), dtype="float32", block_size=block_size, kv_cache_memory_bytes=16 << 20)
    _check(llm, name, reference)


@pytest.mark.parametrize("name", ["mistral-sliding", "qwen2-sliding-upper"])
def test_chunked_prefill_with_a_budget_of_16(model_dirs, reference, name):
    llm = LLM(str(model_dirs[name]), dtype="float32", block_size=4, max_num_batched_tokens=16, kv_cache_memory_bytes=16 << 20)
    _check(llm, name, reference)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_prefix_caching_shares_blocks_behind_the_window(model_dirs, reference, backend):
    """Prompts sharing 48 tokens (twice the window): the later ones hit the cache for blocks the first one
    dropped (they stay cached) and take only those their window reaches; tokens are unchanged."""
    shared = random_prompts([48], seed=12)[0]
    prompts = [shared + tail for tail in random_prompts([1, 6, 20], seed=13)]
    llm = LLM(str(model_dirs["mistral-sliding"]), dtype="float32", block_size=8, attention_backend=backend,
              enable_prefix_caching=True, kv_cache_memory_bytes=16 << 20)
    _check(llm, "mistral-sliding", reference, prompts[:1])
    _check(llm, "mistral-sliding", reference, prompts)
    assert llm.llm_engine.stats().prefix_cache_hits >= 3 * 48


def test_preemption_recomputes_the_same_window(model_dirs, reference):
    """A pool of 14 blocks of 4 tokens for four sequences of up to 117: preemption must happen, and
    every sequence runs to the end (it holds about window / block_size + 2 blocks at a time)."""
    llm = LLM(str(model_dirs["qwen2-sliding-all"]), dtype="float32", block_size=4, num_gpu_blocks_override=14,
              max_num_batched_tokens=16)
    assert llm.llm_engine.max_seq_len == 512  # the whole model context, in a 56-token cache
    _check(llm, "qwen2-sliding-all", reference)
    assert llm.llm_engine.stats().num_preemptions > 0


def _held_blocks_per_step(llm: LLM) -> list[int]:
    """After each step from now on, the blocks held by the first running sequence (filled in as it runs)."""
    engine = llm.llm_engine
    held: list[int] = []
    step = engine.step

    def recording_step():
        outputs = step()
        stats = engine.stats()
        if stats.running:
            seq = stats.running[0]
            held.append(seq.num_blocks)
            assert stats.num_free_blocks == stats.num_blocks - seq.num_blocks
        return outputs

    engine.step = recording_step
    return held


def test_blocks_stay_bounded_far_past_the_window(model_dirs, reference):
    """One sequence generating 10x the window in a cache of 20 blocks of 4 tokens (80 tokens): it never
    holds more than its window's blocks and the next token's, freed ones go back to the pool, and its
    tokens equal transformers'."""
    llm = LLM(str(model_dirs["mistral-sliding"]), dtype="float32", block_size=4, num_gpu_blocks_override=20,
              max_num_batched_tokens=16)
    held = _held_blocks_per_step(llm)
    prompt = random_prompts([10], seed=14)
    _check(llm, "mistral-sliding", reference, prompt, 10 * WINDOW)
    assert len(held) >= 10 * WINDOW - 1
    assert max(held) <= WINDOW // 4 + 1 and min(held[-200:]) >= WINDOW // 4  # bounded, and flat once past the window
    assert max(held) * 4 == sequence_kv_tokens(10 + 10 * WINDOW, WINDOW, 4)  # what `kvserve estimate` counts


def test_a_model_with_full_attention_layers_keeps_every_block(model_dirs, reference):
    """Qwen2 with max_window_layers=1: layer 0 reads every key, so a sequence keeps all its blocks."""
    llm = LLM(str(model_dirs["qwen2-sliding-upper"]), dtype="float32", block_size=4, kv_cache_memory_bytes=16 << 20)
    assert llm.llm_engine.max_seq_len == 512
    held = _held_blocks_per_step(llm)
    _check(llm, "qwen2-sliding-upper", reference, PROMPTS[2:3])
    assert held == [-(-n // 4) for n in range(30, 30 + NEW_TOKENS - 1)]


def test_the_whole_model_context_is_allowed(model_dirs, caplog):
    """No cap at the window, no warning: max_model_len is the model's, and may be asked for."""
    with caplog.at_level("WARNING", logger="kvserve"):
        llm = LLM(str(model_dirs["mistral-sliding"]), dtype="float32", kv_cache_memory_bytes=16 << 20)
    assert llm.llm_engine.config.max_model_len == 512
    assert "window" not in caplog.text
    assert LLM(str(model_dirs["mistral-sliding"]), dtype="float32", kv_cache_memory_bytes=16 << 20,
               max_model_len=100).llm_engine.config.max_model_len == 100
