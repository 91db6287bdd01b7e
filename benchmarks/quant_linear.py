"""The quantized-GGUF product (csrc/quant_linear.cpp) against the dense bf16 kernel and the memory floor.

For each of SmolLM2-135M's projection shapes (N x K: 576 x 576 q/o, 1536 x 576 gate/up,
576 x 1536 down, 49152 x 576 the lm_head) and each format, times `cpu_quant.quant_linear` on
packed blocks and `cpu_linear_kernel` (csrc/linear.cpp) on the same shape in bf16, both with bf16
activations, at a few row counts M. Each variant rotates through enough distinct copies of its
weight (>= 256 MB) that the weights stream from memory, as in a decode step; variants are timed
call by call, interleaved, in several rounds, and the table shows the best and median call. The
floor is the packed bytes at this machine's read bandwidth (best of repeated sums over 256 MiB,
measured before and after, as kvserve.estimate.hardware does).

    PYTHONPATH=src python benchmarks/quant_linear.py --formats Q4_1,Q5_0,Q5_1,Q8_0 --rows 1,4,16,32
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from kvserve.estimate.hardware import cpu_model
from kvserve.layers import cpu_quant
from kvserve.layers.cpu_linear import cpu_linear_kernel

SHAPES = [(576, 576), (1536, 576), (576, 1536), (49152, 576)]  # (N, K)
FORMATS = {name: fmt for fmt, name in cpu_quant.FORMAT_NAMES.items()}
STREAM_BYTES = 256 << 20  # each variant's copies of a weight together: 8x this CPU's L3, so that few reads hit it


def read_bandwidth(num_bytes: int = 256 << 20, seconds: float = 0.5) -> float:
    """Bytes/s of the best of repeated full sums of a tensor far larger than any cache."""
    data = torch.ones(num_bytes // 4)
    data.sum()
    best, deadline = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - start)
    return num_bytes / best


def random_blocks(fmt: int, n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """Packed rows of random bytes whose first fp16 field (every format's d but Q6_K's) is a small finite scale."""
    block_weights, block_bytes = cpu_quant.SUPPORTED_FORMATS[fmt]
    blocks = torch.randint(0, 256, (n, k // block_weights, block_bytes), dtype=torch.uint8, generator=gen)
    offset = 208 if fmt == 14 else 0
    scales = (torch.rand(n, k // block_weights, 1, generator=gen) * 0.02).half()
    blocks[:, :, offset:offset + 2] = scales.view(torch.uint8)
    return blocks.reshape(n, -1)


def time_calls(fn: Callable[[int], object], calls: int, start: int) -> list[float]:
    """Seconds of each of `calls` calls fn(i), i counting from `start` (the copy to use)."""
    times = []
    for i in range(start, start + calls):
        t0 = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--formats", default="Q4_1,Q5_0,Q8_0", help=f"of {', '.join(FORMATS)}")
    parser.add_argument("--rows", default="1,4,16,32")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--calls", type=int, default=16, help="calls per variant per round (fewer for the lm_head)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if cpu_quant.load() is None:
        raise SystemExit("the quantized-linear C++ kernel could not be built")
    formats = [FORMATS[name] for name in args.formats.split(",")]
    rows = [int(r) for r in args.rows.split(",")]
    bandwidth_before = read_bandwidth()
    gen = torch.Generator().manual_seed(0)
    results = []
    for n, k in SHAPES:
        dense_bytes = n * k * 2
        dense = [torch.randn(n, k, generator=gen).bfloat16() for _ in range(max(2, -(-STREAM_BYTES // dense_bytes)))]
        dense_kernel = cpu_linear_kernel(torch.bfloat16, dense[0])
        packed = {}
        for fmt in formats:
            block_weights, block_bytes = cpu_quant.SUPPORTED_FORMATS[fmt]
            nbytes = n * k // block_weights * block_bytes
            packed[fmt] = [random_blocks(fmt, n, k, gen) for _ in range(max(2, -(-STREAM_BYTES // nbytes)))]
        for m in rows:
            x = torch.randn(m, k, generator=gen).bfloat16()
            variants: dict[str, Callable[[int], object]] = {
                "bf16": lambda i: dense_kernel(x, dense[i % len(dense)], None),
            }
            for fmt in formats:
                copies = packed[fmt]
                variants[cpu_quant.FORMAT_NAMES[fmt]] = lambda i, c=copies, f=fmt: cpu_quant.quant_linear(x, c[i % len(c)], f, None, n, k)
            calls = max(4, args.calls if n * k * m < 1 << 24 else args.calls // 4)
            times: dict[str, list[float]] = {name: [] for name in variants}
            for fn in variants.values():
                fn(0)  # warm-up (and library build)
            for rnd in range(args.repeats):
                for name, fn in variants.items():  # interleaved
                    times[name] += time_calls(fn, calls, rnd * calls)
            results.append((n, k, m, {name: (min(t), statistics.median(t)) for name, t in times.items()}))
    bandwidth = max(bandwidth_before, read_bandwidth())
    print(f"{cpu_model()}, {torch.get_num_threads()} threads, read bandwidth {bandwidth_before / 1e9:.1f} GB/s before, "
          f"{bandwidth / 1e9:.1f} best; bf16 activations; per call, best / median of {args.repeats} interleaved rounds")
    header = ["N x K", "M", "bf16 dense us"]
    for fmt in formats:
        name = cpu_quant.FORMAT_NAMES[fmt]
        header += [f"{name} us", f"{name} vs bf16", f"{name} GB/s", f"{name} floor us"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for n, k, m, t in results:
        best_dense, median_dense = t["bf16"]
        cells = [f"{n} x {k}", str(m), f"{best_dense * 1e6:.0f} / {median_dense * 1e6:.0f}"]
        for fmt in formats:
            block_weights, block_bytes = cpu_quant.SUPPORTED_FORMATS[fmt]
            nbytes = n * k // block_weights * block_bytes
            best, median = t[cpu_quant.FORMAT_NAMES[fmt]]
            cells += [f"{best * 1e6:.0f} / {median * 1e6:.0f}", f"{best_dense / best:.2f}x / {median_dense / median:.2f}x",
                      f"{nbytes / best / 1e9:.1f}", f"{nbytes / bandwidth * 1e6:.0f}"]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
