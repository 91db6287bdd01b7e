"""--kv-cache-dtype int8 | fp8_e4m3 through the engine: validated, sized from the budget with its scales,
generating the tokens of the model-dtype cache, and unchanged by prefix caching, forks and preemption."""

from __future__ import annotations

import argparse

import pytest
import torch

from kvserve import LLM, SamplingParams
from kvserve.config import EngineConfig
from kvserve.engine_args import add_engine_arguments, engine_config_from_args
from oracle import assert_greedy_matches, kvserve_greedy, random_prompts

FORMATS = ["int8", "fp8_e4m3"]
BUDGET = 8 << 20
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def engines(tiny_llama):
    """The tiny GQA Llama (2 layers, 1 kv head of 64) in bf16 with each cache format and the same KV budget."""
    return {fmt: LLM(str(tiny_llama), dtype="bfloat16", kv_cache_memory_bytes=BUDGET, kv_cache_dtype=fmt)
            for fmt in ["auto", *FORMATS]}


def test_the_setting_is_validated_and_parsed():
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of auto, int8, fp8_e4m3, got 'int4'"):
        EngineConfig(kv_cache_dtype="int4")
    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    assert engine_config_from_args(parser.parse_args(["--kv-cache-dtype", "fp8_e4m3"])).kv_cache_dtype == "fp8_e4m3"
    assert engine_config_from_args(parser.parse_args([])).kv_cache_dtype == "auto"


@pytest.mark.parametrize("kv_format", FORMATS)
def test_the_same_budget_holds_nearly_twice_the_tokens_of_bf16(engines, kv_format):
    """Counted from the engine's own allocation: a token's K or V row of one kv head takes 64 bytes and a 4-byte
    scale against 128 bytes in bf16, so 128 / 68 = 1.88x the blocks (an fp16 scale would give 1.94x)."""
    bf16, quantized = engines["auto"].llm_engine, engines[kv_format].llm_engine
    layers, kv_heads, head_dim, block_size = 2, 1, 64, 16
    per_block = block_size * 2 * layers * kv_heads * (head_dim + 4)
    blocks = quantized.stats().num_blocks
    assert blocks == BUDGET // per_block
    assert blocks / bf16.stats().num_blocks >= 1.8
    assert quantized.worker_info.kv_cache_bytes == blocks * per_block <= BUDGET
    cache = quantized.executor.worker.runner.kv_caches[0]
    assert cache.key.dtype == {"int8": torch.int8, "fp8_e4m3": torch.float8_e4m3fn}[kv_format]
    assert cache.key.shape == (blocks, block_size, kv_heads, head_dim)
    assert cache.key_scale.dtype == torch.float32 and cache.key_scale.shape == (blocks, kv_heads, block_size)
    plan = quantized.worker_info.kernel_plan
    assert plan.kv_cache_dtype == kv_format and f"KV cache: {kv_format} + fp32 scales" in plan.describe()
    assert plan.attention_backend == "cpu" and plan.one_call_layers == 2  # the C++ paths read it in place


@pytest.mark.parametrize("kv_format", FORMATS)
def test_greedy_tokens_match_the_bf16_cache(engines, kv_format):
    """Quantization error may flip a near-tie (then each side's token is the other's runner-up), no more."""
    prompts = random_prompts([1, 3, 17, 40, 64, 100, 150, 200])
    want = kvserve_greedy(engines["auto"], prompts, NEW_TOKENS)
    exact = assert_greedy_matches(kvserve_greedy(engines[kv_format], prompts, NEW_TOKENS), want)
    assert exact >= len(prompts) // 2


@pytest.mark.parametrize("kv_format", FORMATS)
def test_prefix_caching_forks_and_preemption_keep_the_tokens(tiny_model_dirs, kv_format):
    """Cached blocks are reused with their scales, a copy-on-write copy carries them (a fork reading a copied
    block without them would diverge), and preempted sequences recompute into fresh blocks."""
    model = str(tiny_model_dirs["qwen2"])
    shared = random_prompts([40], seed=5)[0]
    prompts = [shared + tail for tail in random_prompts([1, 7, 20], seed=6)]
    plain = LLM(model, dtype="float32", kv_cache_memory_bytes=BUDGET, enable_prefix_caching=False, kv_cache_dtype=kv_format)
    want = kvserve_greedy(plain, prompts, NEW_TOKENS)

    cached = LLM(model, dtype="float32", kv_cache_memory_bytes=BUDGET, kv_cache_dtype=kv_format)
    got = kvserve_greedy(cached, prompts[:1], NEW_TOKENS) + kvserve_greedy(cached, prompts[1:], NEW_TOKENS)
    assert cached.llm_engine.stats().prefix_cache_hits >= 2 * 32  # two full blocks of the shared prefix, twice
    assert_greedy_matches(got, want)

    forks = SamplingParams(n=2, temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    runner = cached.llm_engine.executor.worker.runner
    copies: list[tuple[int, int]] = []
    copy_blocks = runner.copy_blocks
    runner.copy_blocks = lambda c: (copies.extend(c), copy_blocks(c))
    try:
        outs = cached.generate(prompt_token_ids=prompts[2:3], sampling_params=forks, use_tqdm=False)[0].outputs
    finally:
        runner.copy_blocks = copy_blocks
    assert copies and [o.token_ids for o in outs] == [want[2][0], want[2][0]]

    # the prompts fit in 12 of the 14 blocks, but growing by 32 tokens each needs about 25 (test_equality.py)
    prompts = random_prompts([14, 15, 30, 31, 12, 47, 9, 16], seed=3)
    want = kvserve_greedy(plain, prompts, 32)
    small = LLM(model, dtype="float32", num_gpu_blocks_override=14, enable_prefix_caching=False, kv_cache_dtype=kv_format)
    got = kvserve_greedy(small, prompts, 32)
    assert small.llm_engine.stats().num_preemptions > 0
    assert_greedy_matches(got, want)


def test_copy_blocks_copies_values_and_scales(engines):
    runner = engines["int8"].llm_engine.executor.worker.runner
    cache = runner.kv_caches[1]
    before = [t.clone() for t in cache.tensors()]
    for t in cache.tensors():
        t[3] = torch.randint(-100, 100, t[3].shape).to(t.dtype)
    runner.copy_blocks([(3, 5)])
    for t in cache.tensors():
        assert torch.equal(t[5], t[3])
    for t, b in zip(cache.tensors(), before):  # leave the engine's cache as it was
        t.copy_(b)
