"""What the speculative-decoding tests share: prompts with repeats, the pool check, and the chi-square test of a
sampled pair of tokens against transformers' exact distribution."""

from __future__ import annotations

from pathlib import Path

import torch

from kvserve import LLM, SamplingParams

# prompts with repeats, so that prompt lookup has proposals from the first decode on
PROMPTS = [[5, 9, 5, 9, 5, 9, 3, 7, 5, 9, 5, 9] * 2, [7, 8, 9, 10, 11] * 5, [2, 3, 4, 2, 3, 4, 2, 3], [40, 41, 42] * 6]


def generate(llm: LLM, params: SamplingParams, prompts=PROMPTS):
    return llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)


def assert_pool_back(llm: LLM) -> None:
    stats = llm.llm_engine.stats()
    assert not llm.llm_engine.has_unfinished_requests()
    assert stats.num_free_blocks == stats.num_blocks


def exact_pairs(model_dir: Path, prompt: list[int]) -> dict[tuple[int, int], float]:
    """P(first two sampled tokens) under top_k 4 at temperature 1, from transformers."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)

    def top4(ids: list[int]) -> tuple[list[int], torch.Tensor]:
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1]
        values, idx = logits.topk(4)
        return idx.tolist(), torch.softmax(values, dim=-1)

    expected: dict[tuple[int, int], float] = {}
    first, p_first = top4(prompt)
    for t1, p1 in zip(first, p_first.tolist()):
        second, p_second = top4(prompt + [t1])
        for t2, p2 in zip(second, p_second.tolist()):
            expected[(t1, t2)] = p1 * p2
    return expected


def assert_pairs_fit(outs, expected: dict[tuple[int, int], float]) -> None:
    """The outputs' first two tokens fit `expected` (chi-square, p > 0.001)."""
    counts: dict[tuple[int, int], int] = {}
    for out in outs:
        pair = tuple(out.outputs[0].token_ids[:2])
        counts[pair] = counts.get(pair, 0) + 1
    assert set(counts) <= set(expected)
    n = len(outs)
    observed = torch.tensor([counts.get(pair, 0) for pair in expected], dtype=torch.float64)
    mean = torch.tensor([p * n for p in expected.values()], dtype=torch.float64)
    chi2 = float(((observed - mean) ** 2 / mean).sum())
    p_value = float(torch.special.gammaincc(torch.tensor((len(expected) - 1) / 2, dtype=torch.float64),
                                            torch.tensor(chi2 / 2, dtype=torch.float64)))
    assert p_value > 0.001, (chi2, counts)
