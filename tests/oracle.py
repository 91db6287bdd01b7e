"""The correctness oracle: transformers' greedy decoding on the same weights, and the comparison rule."""

from __future__ import annotations

import random
from pathlib import Path

import torch

from kvserve import LLM, SamplingParams


def random_prompts(lengths: list[int], vocab: int = 512, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(2, vocab) for _ in range(n)] for n in lengths]


PROMPT_LENGTHS = [1, 3, 17, 40, 64, 100, 150, 200]


def hf_greedy(model_dir: Path | str, prompts: list[list[int]], max_new_tokens: int) -> list[tuple[list[int], list[list[int]]]]:
    """transformers greedy continuation of each prompt: (new tokens, top-2 ids at each step)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    results = []
    with torch.no_grad():
        for ids in prompts:
            out = model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                do_sample=False,
                max_new_tokens=max_new_tokens,
                min_new_tokens=max_new_tokens,
                output_scores=True,
                return_dict_in_generate=True,
                pad_token_id=0,
                eos_token_id=None,
            )
            tokens = out.sequences[0, len(ids) :].tolist()
            top2 = [s[0].topk(2).indices.tolist() for s in out.scores]
            results.append((tokens, top2))
    return results


def assert_greedy_matches(ours: list[tuple[list[int], list[list[int]]]], theirs: list[tuple[list[int], list[list[int]]]]) -> int:
    """Equal tokens up to the first divergence; at a divergence each side's token must be the other's runner-up
    (a near-tie that float rounding may break either way, as in vLLM's check_logprobs_close). Returns #exact."""
    exact = 0
    for i, ((a, a_top), (b, b_top)) in enumerate(zip(ours, theirs)):
        assert len(a) == len(b), f"prompt {i}: {len(a)} tokens vs {len(b)}"
        for j, (x, y) in enumerate(zip(a, b)):
            if x != y:
                assert x in b_top[j] and y in a_top[j], f"prompt {i} token {j}: kvserve {x} (top2 {a_top[j]}) vs transformers {y} (top2 {b_top[j]})"
                break
        else:
            exact += 1
    return exact


def kvserve_greedy(llm: LLM, prompts: list[list[int]], max_new_tokens: int) -> list[tuple[list[int], list[list[int]]]]:
    params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, ignore_eos=True, logprobs=2)
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    results = []
    for out in outs:
        c = out.outputs[0]
        top2 = [sorted(step, key=lambda t: -step[t].logprob)[:2] for step in c.logprobs]
        results.append((c.token_ids, top2))
    return results
