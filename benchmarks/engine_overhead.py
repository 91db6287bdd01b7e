"""Engine overhead per decode step: the wall time of `LLMEngine.step()` minus the model's forward, the logits
and the sampler — what scheduling, the step contract, batch preparation, updates and detokenization cost.

    python benchmarks/engine_overhead.py --dtype bfloat16 --batch-sizes 1 256 --steps 20

Prints the median over `--steps` decode steps after the prompts are prefilled (greedy, 128-token prompts).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from kvserve import LLM, SamplingParams
from kvserve.layers.sampler import Sampler


@contextmanager
def timed(owner: Any, name: str, spent: list[float]) -> Iterator[None]:
    """Add the time spent in `owner.name` to `spent[0]` while the block runs."""
    original: Callable = getattr(owner, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - started

    setattr(owner, name, wrapper)
    try:
        yield
    finally:
        setattr(owner, name, original)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 256])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--prompt-len", type=int, default=128)
    args = parser.parse_args()

    llm = LLM(args.model, dtype=args.dtype, kv_cache_memory_bytes=1 << 30, max_num_seqs=max(args.batch_sizes))
    engine = llm.llm_engine
    model_class = type(engine.executor.worker.model)
    for batch in args.batch_sizes:
        params = SamplingParams(temperature=0, max_tokens=args.steps + 4, ignore_eos=True)
        for i in range(batch):
            engine.add_request(f"{batch}-{i}", [100 + (i * 7 + j) % 1000 for j in range(args.prompt_len)], params)
        engine.step()
        while engine.last_step.num_prefill_tokens:
            engine.step()
        spent = [0.0]
        overheads = []
        with timed(model_class, "forward", spent), timed(model_class, "compute_logits", spent), timed(Sampler, "__call__", spent):
            for _ in range(args.steps):
                spent[0] = 0.0
                started = time.perf_counter()
                engine.step()
                overheads.append(time.perf_counter() - started - spent[0])
        print(f"batch {batch}: engine overhead per decode step {statistics.median(overheads) * 1e3:.3f} ms (median of {args.steps})")
        for request_id in engine.unfinished_request_ids():
            engine.abort_request(request_id)


if __name__ == "__main__":
    main()
