"""Greedy equality with transformers on the real checkpoints in ../shared/models."""

from __future__ import annotations

import pytest

from kvserve import LLM, SamplingParams
from conftest import SMOLLM2_GGUF
from oracle import assert_greedy_matches, hf_greedy, kvserve_greedy

STORY_PROMPTS = [
    "Once upon a time",
    "Lily",
    "The cat sat on the mat and looked at the big red ball. It wanted to",
    "One day, a boy named Tom went to the park with his mom. He saw a dog. The dog was brown and",
    "Sara had a doll",
    "The sun was shining. The birds were singing. Ben and his friend Mia played in the garden all day, and when it got dark",
    "Once there was a fish who lived in a small pond near a big tree with green leaves and",
    "Tim",
]


def test_stories260k_matches_published_sample(stories_dir):
    llm = LLM(str(stories_dir), dtype="float32", kv_cache_memory_bytes=8 << 20)
    out = llm.generate(["Once upon a time"], SamplingParams(temperature=0, max_tokens=40), use_tqdm=False)[0]
    assert out.prompt_token_ids == [1, 403, 407, 261, 378]
    assert out.outputs[0].token_ids[:10] == [432, 383, 286, 261, 376, 298, 315, 421, 395, 317]
    assert out.outputs[0].text.startswith(", there was a little girl named Lily. She loved to play outside in the park.")


def test_stories260k_matches_transformers(stories_dir):
    llm = LLM(str(stories_dir), dtype="float32", kv_cache_memory_bytes=8 << 20, block_size=4, max_num_batched_tokens=32)
    prompts = [llm.get_tokenizer()(p).input_ids for p in STORY_PROMPTS]
    ours = kvserve_greedy(llm, prompts, 48)
    assert assert_greedy_matches(ours, hf_greedy(stories_dir, prompts, 48)) >= len(prompts) - 1


def test_smollm2_from_gguf_matches_transformers(smollm2_hf_dir):
    """kvserve reads the Q4_1 GGUF itself, dequantized (the quantized twin is checked below); transformers
    reads the safetensors converted from it."""
    llm = LLM(str(SMOLLM2_GGUF), dtype="float32", quantization="none", kv_cache_memory_bytes=128 << 20, max_num_batched_tokens=128)
    tokenizer = llm.get_tokenizer()
    chats = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three colors."}],
    ]
    prompts = [tokenizer(p).input_ids for p in STORY_PROMPTS] + [
        tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=False) for c in chats
    ]
    ours = kvserve_greedy(llm, prompts, 16)
    assert assert_greedy_matches(ours, hf_greedy(smollm2_hf_dir, prompts, 16)) >= len(prompts) - 1
    paris = llm.generate(prompt_token_ids=[prompts[-2]], sampling_params=SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)[0]
    assert "Paris" in paris.outputs[0].text


def _weight_bytes(llm: LLM) -> int:
    """Bytes of every tensor the model holds (parameters, packed blocks, buffers), each storage once."""
    model = llm.llm_engine.executor.worker.model
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [packed.blocks for m in model.modules() if getattr(m, "quantized", None) for _, packed in m.quantized.parts]
    tensors += [m.packed.blocks for m in model.modules() if getattr(m, "packed", None) is not None]
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


@pytest.mark.skipif(not SMOLLM2_GGUF.is_file(), reason=f"{SMOLLM2_GGUF} is absent (the real checkpoints live in ../shared/models)")
def test_smollm2_runs_quantized_from_its_blocks():
    """By default the Q4_1 GGUF stays in its blocks (Q4_1 linears, a Q8_0 tied embedding and LM head) in
    under 110 MB, answers the README's question, and scores a text as its dequantized twin does: the same
    numbers, only the activations rounded to int8 blocks inside the products."""
    import math
    from pathlib import Path

    quantized = LLM(str(SMOLLM2_GGUF), kv_cache_memory_bytes=64 << 20)
    plan = quantized.llm_engine.worker_info.kernel_plan
    assert plan.packed_linears == plan.linears and plan.packed_formats == ("Q4_1", "Q8_0")
    assert plan.one_call_layers == plan.decoder_layers
    assert _weight_bytes(quantized) <= 110 << 20
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    ids = quantized.get_tokenizer().apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False)
    answer = quantized.generate(prompt_token_ids=[ids], sampling_params=SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)[0]
    assert "Paris" in answer.outputs[0].text

    text = (Path(__file__).resolve().parents[1] / "benchmarks" / "data" / "kjv_genesis.txt").read_text()
    tokens = quantized.get_tokenizer()(text, add_special_tokens=False).input_ids[:1024]
    params = SamplingParams(max_tokens=1, prompt_logprobs=0)

    def nll(llm: LLM) -> float:
        out = llm.generate(prompt_token_ids=[tokens], sampling_params=params, use_tqdm=False)[0]
        return -sum(entry[t].logprob for t, entry in zip(tokens[1:], out.prompt_logprobs[1:])) / (len(tokens) - 1)

    dense = LLM(str(SMOLLM2_GGUF), quantization="none", kv_cache_memory_bytes=64 << 20)
    assert math.exp(nll(quantized)) == pytest.approx(math.exp(nll(dense)), rel=0.01)
