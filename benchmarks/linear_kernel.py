"""The C++ linear kernel against F.linear on one decode step's worth of weights.

Runs every projection of a model shape (default: SmolLM2-135M's layers plus its
vocabulary head) once per repetition with distinct weights per layer, so the
weights stream from memory as in a real step, for a range of row counts M. Prints
weight GB/s, GFLOP/s and the kernel/torch speedup; the crossover sets
`kvserve.layers.cpu_linear.max_rows`.

    .venv/bin/python benchmarks/linear_kernel.py --dtype float32 --rows 1,2,4,8,16,32,64
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from kvserve.layers.cpu_linear import cpu_linear_kernel

# (out_features, in_features) of SmolLM2-135M: qkv, o, gate_up, down; the head separately.
LAYER_SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]
HEAD_SHAPE = (49152, 576)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--rows", default="1,2,4,8,16,32,64,128")
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    weights = [torch.randn(n, k).to(dtype) for _ in range(args.layers) for n, k in LAYER_SHAPES]
    weights.append(torch.randn(*HEAD_SHAPE).to(dtype))
    weight_bytes = sum(w.numel() * w.element_size() for w in weights)
    params = sum(w.numel() for w in weights)
    kernels = [cpu_linear_kernel(dtype, w) for w in weights]
    if kernels[0] is None:
        raise SystemExit("the C++ linear kernel could not be built")
    print(f"{args.dtype}: {len(weights)} weights, {weight_bytes / 1e6:.0f} MB, {torch.get_num_threads()} threads")
    print(f"{'M':>5} {'torch ms':>9} {'kernel ms':>9} {'torch GB/s':>10} {'kernel GB/s':>11} {'kernel GFLOP/s':>14} {'speedup':>8}")
    for m in (int(r) for r in args.rows.split(",")):
        inputs = {k: torch.randn(m, k).to(dtype) for k in {w.shape[1] for w in weights}}

        def torch_pass() -> None:
            for w in weights:
                F.linear(inputs[w.shape[1]], w)

        def kernel_pass() -> None:
            for w, kern in zip(weights, kernels):
                kern(inputs[w.shape[1]], w, None)

        times = {}
        for name, fn in (("torch", torch_pass), ("kernel", kernel_pass)):
            fn()
            best = float("inf")
            for _ in range(args.repeats):
                start = time.perf_counter()
                fn()
                best = min(best, time.perf_counter() - start)
            times[name] = best
        t, k = times["torch"], times["kernel"]
        print(
            f"{m:>5} {t * 1e3:>9.2f} {k * 1e3:>9.2f} {weight_bytes / t / 1e9:>10.1f} {weight_bytes / k / 1e9:>11.1f}"
            f" {2 * params * m / k / 1e9:>14.1f} {t / k:>7.2f}x"
        )


if __name__ == "__main__":
    main()
