"""A random paged batch: q and a KV cache whose blocks are scattered, for checking and timing attention
backends (tests/test_attention.py and the kernel tests built on it, benchmarks/triton_attention.py)."""

from __future__ import annotations

import random

import torch

from kvserve.attention.metadata import AttentionMetadata


def random_paged_batch(
    query_lens: list[int],
    seq_lens: list[int],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    seed: int = 0,
    spare_blocks: int = 5,
    device: str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata]:
    """Random q, k_cache, v_cache and their metadata: each sequence gets random block ids among the cache's
    blocks, `spare_blocks` of which are left unused. Sequences whose query length is 1 come first (decodes)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    rng = random.Random(seed)
    num_blocks = sum(-(-n // block_size) for n in seq_lens) + spare_blocks
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen, device=device).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen, device=device).to(dtype)
    free = list(range(num_blocks))
    rng.shuffle(free)
    tables = [[free.pop() for _ in range(-(-n // block_size))] for n in seq_lens]
    block_tables = torch.zeros(len(seq_lens), max(len(t) for t in tables), dtype=torch.int64)
    for i, t in enumerate(tables):
        block_tables[i, : len(t)] = torch.tensor(t)
    qsl = [0]
    for n in query_lens:
        qsl.append(qsl[-1] + n)
    num_decodes = next((i for i, n in enumerate(query_lens) if n != 1), len(query_lens))
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(0, dtype=torch.long, device=device),
        query_start_loc=torch.tensor(qsl, device=device),
        seq_lens=torch.tensor(seq_lens, device=device),
        block_tables=block_tables.to(device),
        num_decodes=num_decodes,
        query_start_loc_cpu=qsl,
        seq_lens_cpu=list(seq_lens),
        block_size=block_size,
    )
    q = torch.randn(qsl[-1], num_heads, head_dim, generator=gen, device=device).to(dtype)
    return q, k_cache, v_cache, meta
