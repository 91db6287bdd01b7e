"""The Python around one call of the one-call decoder layer (models/llama_cpu_layer.py), without the call.

Generates `--tokens` greedy tokens with the default model (or --model), and for every layer call
times `CpuLlamaLayer.__call__` once more with its C++ function replaced by a no-op: what is left is
the wrapper's own cost (struct fields, tensor pointers, output allocation, argument marshalling of
a Python call). Prints the median and 10th percentile in microseconds, and the total per step.

    PYTHONPATH=src python benchmarks/layer_call_overhead.py [--model M] [--tokens 32]
"""

from __future__ import annotations

import argparse
import statistics
import time

from kvserve import LLM, SamplingParams
from kvserve.models.llama_cpu_layer import CpuLlamaLayer


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: the built-in default model")
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args()
    llm = LLM(args.model)
    wrapper_ns: list[int] = []
    layers: set[int] = set()
    real_call = CpuLlamaLayer.__call__

    def timed(self: CpuLlamaLayer, *call_args, **kwargs):  # type: ignore[no-untyped-def]
        fn, self.fn = self.fn, lambda *_: None
        start = time.perf_counter_ns()
        real_call(self, *call_args, **kwargs)
        wrapper_ns.append(time.perf_counter_ns() - start)
        self.fn = fn
        layers.add(id(self))
        return real_call(self, *call_args, **kwargs)

    CpuLlamaLayer.__call__ = timed  # type: ignore[method-assign]
    try:
        llm.generate(["Hello there, how are you?"], SamplingParams(max_tokens=args.tokens, temperature=0), use_tqdm=False)
    finally:
        CpuLlamaLayer.__call__ = real_call  # type: ignore[method-assign]
    if not wrapper_ns:
        print("no one-call layer ran (see the kernel plan in the log)")
        return 1
    median = statistics.median(wrapper_ns) / 1e3
    p10 = sorted(wrapper_ns)[len(wrapper_ns) // 10] / 1e3
    print(f"{len(wrapper_ns)} layer calls: median {median:.2f} us, p10 {p10:.2f} us; "
          f"{len(layers)} layers: {median * len(layers) / 1e3:.3f} ms a step")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
