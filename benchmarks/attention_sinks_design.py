"""Why attention sinks use a second query instead of re-rotating keys: the three designs' costs, measured.

    python benchmarks/attention_sinks_design.py [--window 1024] [--batch 1 16] [--dtype bfloat16]

One SmolLM2-135M layer's shapes (9 query heads, 3 kv heads, head_dim 64), block size 16, W = 1024, 4 sinks:

- sinks query (kvserve): per decode step, the window's attention (CPU kernel, giving its log-sum-exp)
  plus the extra work: rotating a second query, scoring the sinks, merging (attention/attention_sinks.py);
- re-rotate on drop: each time a block leaves the window, every kept window key is rotated back by
  block_size positions in place (amortized over block_size steps), and the rounding error it leaves in
  the cache's dtype after a key has been re-rotated W / block_size times;
- rotate at attention: K kept un-rotated, every window key rotated every step before attending
  (here in torch; a kernel would fuse it, but still rotate W keys per layer per step).
"""

from __future__ import annotations

import argparse
import time

import torch

from kvserve.attention import attention_sinks, cpu
from kvserve.attention.attention_sinks import StreamingWindow
from kvserve.attention.random_batch import random_paged_batch

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 9, 3, 64, 16


def timed(fn, repeat: int = 50) -> float:
    fn()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(repeat):
            fn()
        best = min(best, (time.perf_counter() - start) / repeat)
    return best * 1e6


def rotate(x: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    cos, sin = angle.cos(), angle.sin()
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    window, streaming = args.window, StreamingWindow(4, args.window)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM))
    print(f"one layer, {HEADS}/{KV_HEADS} heads x {HEAD_DIM}, {args.dtype}, W={window}, block {BLOCK}, "
          f"{torch.get_num_threads()} threads; microseconds per decode step")
    for batch in args.batch:
        length = 3 * window
        q, k, v, meta = random_paged_batch([1] * batch, [length] * batch, HEADS, KV_HEADS, HEAD_DIM, BLOCK, dtype)
        lse = torch.empty(q.shape[:2])
        window_only = timed(lambda: cpu.paged_attention_cpu(q, k, v, meta, 0.125, sliding_window=window))
        with_lse = timed(lambda: cpu.paged_attention_cpu(q, k, v, meta, 0.125, sliding_window=window, lse=lse))
        positions = torch.full((batch,), length - 1)

        def sinks_part() -> None:
            q_sink = rotate(q, streaming.cache_positions(positions)[:, None, None] * inv_freq - 0.0)
            part = attention_sinks.sink_attention(q_sink, k, v, meta, 0.125, streaming)
            attention_sinks.merge(q, lse, *part)

        extra = timed(sinks_part)
        window_keys = torch.randn(batch, window, KV_HEADS, HEAD_DIM).to(dtype)
        shift = -BLOCK * inv_freq
        rerotate = timed(lambda: window_keys.copy_(rotate(window_keys, shift))) / BLOCK
        angles = torch.arange(window)[:, None, None].float() * inv_freq
        rotate_all = timed(lambda: rotate(window_keys, angles))
        print(f"batch {batch:>3}: window attention {window_only:8.1f} (+lse {with_lse - window_only:+6.1f});  "
              f"sinks query +{extra:7.1f} ({extra / window_only:5.1%});  re-rotate on drop +{rerotate:7.1f} "
              f"({rerotate / window_only:5.1%});  rotate at attention +{rotate_all:8.1f} ({rotate_all / window_only:5.1%})")

    key = torch.randn(100_000, HEAD_DIM)
    drops = window // BLOCK
    for name, store in (("bfloat16", torch.bfloat16), ("float16", torch.float16)):
        kept = key.to(store)
        for _ in range(drops):
            kept = rotate(kept, -BLOCK * inv_freq).to(store)
        exact = rotate(key, -drops * BLOCK * inv_freq).to(store).float()
        once = (exact - rotate(key.to(store), -drops * BLOCK * inv_freq).float()).norm(dim=-1) / key.norm(dim=-1)
        error = (kept.float() - exact).norm(dim=-1) / key.norm(dim=-1)
        print(f"re-rotating a {name} key {drops} times (it stays W / block_size drops in the window): relative error "
              f"{error.mean():.2e} mean, {error.max():.2e} max, against {once.mean():.2e} for one rotation")


if __name__ == "__main__":
    main()
