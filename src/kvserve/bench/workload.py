"""Benchmark workloads: random token-id prompts with fixed or uniformly drawn lengths.

Prompts are random token ids, not text, so every engine sees exactly the same
tokens (no tokenizer differences) and no two prompts share a prefix (the prefix
cache cannot make the run trivially cheap). Every request generates exactly its
``output_len`` tokens (EOS is ignored), as in vLLM's throughput benchmark.
"""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass


@dataclass(frozen=True)
class BenchRequest:
    prompt_token_ids: list[int]
    output_len: int


@dataclass(frozen=True)
class Workload:
    requests: list[BenchRequest]
    input_len: tuple[int, int]
    output_len: tuple[int, int]
    seed: int

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(r.prompt_token_ids) for r in self.requests)

    @property
    def num_output_tokens(self) -> int:
        return sum(r.output_len for r in self.requests)

    @property
    def num_total_tokens(self) -> int:
        return self.num_prompt_tokens + self.num_output_tokens

    @property
    def max_seq_len(self) -> int:
        return max(len(r.prompt_token_ids) + r.output_len for r in self.requests)

    def describe(self) -> str:
        """``32 prompts, input 32–256 tokens, output 64 tokens``."""
        return (f"{len(self.requests)} prompts, input {_span(self.input_len)} tokens, "
                f"output {_span(self.output_len)} tokens")

    def to_dict(self) -> dict:
        return {
            "num_prompts": len(self.requests),
            "input_len": list(self.input_len),
            "output_len": list(self.output_len),
            "seed": self.seed,
            "num_prompt_tokens": self.num_prompt_tokens,
            "num_output_tokens": self.num_output_tokens,
            "num_total_tokens": self.num_total_tokens,
        }


def _span(bounds: tuple[int, int]) -> str:
    low, high = bounds
    return str(low) if low == high else f"{low}–{high}"


def random_workload(num_prompts: int, input_len: tuple[int, int], output_len: tuple[int, int],
                    vocab_size: int, seed: int) -> Workload:
    """``num_prompts`` requests; lengths uniform in the inclusive ranges, token ids uniform in the vocabulary."""
    if num_prompts < 1:
        raise ValueError(f"num_prompts must be >= 1, got {num_prompts}")
    for name, (low, high) in (("input_len", input_len), ("output_len", output_len)):
        if not 1 <= low <= high:
            raise ValueError(f"{name} range must satisfy 1 <= low <= high, got {low}..{high}")
    rng = random.Random(seed)
    requests = []
    for _ in range(num_prompts):
        n_in = rng.randint(*input_len)
        requests.append(BenchRequest([rng.randrange(vocab_size) for _ in range(n_in)], rng.randint(*output_len)))
    return Workload(requests, input_len, output_len, seed)


def add_length_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, input_len: int,
                         output_len: int) -> None:
    """``--input-len N`` or ``--input-len-range A B``; the same for the output (on a parser or an argument group)."""
    for name, default in (("input", input_len), ("output", output_len)):
        group = parser.add_mutually_exclusive_group()
        group.add_argument(f"--{name}-len", type=int, default=default,
                           help=f"{name} tokens per request (default {default})")
        group.add_argument(f"--{name}-len-range", type=int, nargs=2, metavar=("LOW", "HIGH"), default=None,
                           help=f"draw the {name} length of each request uniformly from LOW..HIGH (inclusive)")


def length_range(args: argparse.Namespace, name: str) -> tuple[int, int]:
    """The ``(low, high)`` length range given by ``--NAME-len`` or ``--NAME-len-range``."""
    span = getattr(args, f"{name}_len_range")
    if span is not None:
        return int(span[0]), int(span[1])
    value = getattr(args, f"{name}_len")
    return value, value
