"""Attention over an int8 / fp8 e4m3 KV cache against the same cache in bf16 (--kv-cache-dtype).

One step's attention over `--layers` layers' caches (distinct tensors, blocks shuffled, so the KV
streams from memory as in a real step): `--batch` sequences of `--context` tokens each whose last
`--query-len` tokens are queries (1: decodes; more: prefill chunks, causal), SmolLM2's heads by
default (9 query / 3 kv heads of 64). The cache formats are timed in turn within each repetition
(the machine is shared: only side-by-side numbers compare). Prints, per format, the median and best
step time, the KV bytes read per step (values and scales) and the rate they are read at.

    .venv/bin/python benchmarks/kv_cache_dtype_attention.py --batch 8 --context 4096
    .venv/bin/python benchmarks/kv_cache_dtype_attention.py --batch 4 --context 512 --query-len 512 --layers 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from kvserve.attention import cpu, kv_quant
from kvserve.attention.kv_cache import KVCache
from kvserve.attention.metadata import AttentionMetadata


def random_caches(args: argparse.Namespace, num_blocks: int, kv_format: str, gen: torch.Generator) -> list[KVCache]:
    """`args.layers` caches of random K/V (N(0, 1) in bf16), quantized for int8 / fp8."""
    shape = (num_blocks, args.block_size, args.kv_heads, args.head_dim)
    caches = []
    for _ in range(args.layers):
        key, value = (torch.randn(shape, generator=gen).to(torch.bfloat16) for _ in range(2))
        if not kv_quant.is_quantized(kv_format):
            caches.append(KVCache(key, value))
            continue
        (k_values, k_scale), (v_values, v_scale) = (kv_quant.quantize(t, kv_format) for t in (key, value))
        caches.append(KVCache(k_values, v_values, k_scale.transpose(1, 2).contiguous(), v_scale.transpose(1, 2).contiguous()))
    return caches


def step_metadata(args: argparse.Namespace, num_blocks: int, gen: torch.Generator) -> AttentionMetadata:
    """`args.batch` sequences of `args.context` keys, the last `args.query_len` of them queries, their blocks
    scattered over the cache."""
    per_seq = -(-args.context // args.block_size)
    tables = torch.randperm(num_blocks, generator=gen)[: args.batch * per_seq].view(args.batch, per_seq)
    qsl = [i * args.query_len for i in range(args.batch + 1)]
    lens = [args.context] * args.batch
    return AttentionMetadata(
        slot_mapping=torch.zeros(0, dtype=torch.int64), query_start_loc=torch.tensor(qsl), seq_lens=torch.tensor(lens),
        block_tables=tables.to(torch.int64), num_decodes=args.batch if args.query_len == 1 else 0,
        query_start_loc_cpu=qsl, seq_lens_cpu=lens, block_size=args.block_size,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--query-len", type=int, default=1, help="queries per sequence (1: decode)")
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--formats", default="auto,int8,fp8_e4m3", help="--kv-cache-dtype values to time (auto: bf16)")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    if not 1 <= args.query_len <= args.context:
        parser.error(f"--query-len must be in [1, --context {args.context}], got {args.query_len}")
    formats = args.formats.split(",")
    for kv_format in formats:
        kv_quant.check_kv_cache_dtype(kv_format)
    gen = torch.Generator().manual_seed(0)
    num_blocks = args.batch * -(-args.context // args.block_size)
    caches = {fmt: random_caches(args, num_blocks, fmt, gen) for fmt in formats}
    meta = step_metadata(args, num_blocks, gen)
    q = torch.randn(args.batch * args.query_len, args.heads, args.head_dim, generator=gen).to(torch.bfloat16)
    scale = args.head_dim**-0.5
    read = {fmt: args.batch * args.context * args.layers * 2 * args.kv_heads
            * kv_quant.bytes_per_head_token(fmt, torch.bfloat16, args.head_dim) for fmt in formats}

    def step(fmt: str) -> float:
        started = time.perf_counter()
        for cache in caches[fmt]:
            cpu.paged_attention_cpu(q, cache.key, cache.value, meta, scale, *cache.scales)
        return time.perf_counter() - started

    times: dict[str, list[float]] = {fmt: [] for fmt in formats}
    for fmt in formats:
        step(fmt)  # warm-up
    for _ in range(args.repeats):
        for fmt in formats:
            times[fmt].append(step(fmt))
    base = statistics.median(times[formats[0]])
    rows = []
    for fmt in formats:
        median = statistics.median(times[fmt])
        rows.append({"kv_cache_dtype": fmt, "median_ms": median * 1e3, "best_ms": min(times[fmt]) * 1e3,
                     "kv_mb_read": read[fmt] / 1e6, "gb_per_s": read[fmt] / median / 1e9,
                     f"vs_{formats[0]}": median / base})
    print(json.dumps({"shape": vars(args), "threads": torch.get_num_threads(), "results": rows}, indent=1))
    print(f"| --kv-cache-dtype | step ({args.layers} layers), median (best) | KV read | rate | vs {formats[0]} |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['kv_cache_dtype']} | {r['median_ms']:.1f} ms ({r['best_ms']:.1f}) | {r['kv_mb_read']:.0f} MB "
              f"| {r['gb_per_s']:.1f} GB/s | {r[f'vs_{formats[0]}']:.2f}x |")


if __name__ == "__main__":
    main()
