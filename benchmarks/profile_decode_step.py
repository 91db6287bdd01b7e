"""Where the time of one kvserve decode step goes, at a given batch size (cProfile).

    .venv/bin/python benchmarks/profile_decode_step.py --dtype float32 --batch-sizes 1 32

Loads the default model (or --model), starts ``batch`` requests with random
``--prompt-len``-token prompts, steps until every prompt is prefilled, then
times ``--steps`` plain decode steps (wall clock, no profiler) and profiles as
many more. The profiled step is split into:

- linear: every ``Linear.forward`` (q/k/v, o, gate/up, down, lm_head), and the down projection
  where the C++ kernel fuses the SiLU-and-mul into it (``CpuLinearKernel.silu_and_linear``: its
  SiLU counts as linear);
- attention: ``Attention.forward`` (KV cache write + the attention backend);
- other model ops: the rest of the forward (embedding, norms, rotary, SiLU, residuals);
- sampling: ``Sampler.__call__``;
- engine overhead: the rest of ``LLMEngine.step`` (scheduling, batch preparation,
  sequence updates, detokenization, outputs).

cProfile adds a little to every Python call, so the shares of the Python-heavy
parts are upper bounds; the unprofiled step time is printed next to them.
"""

from __future__ import annotations

import argparse
import cProfile
import inspect
import pstats
import random
import time

import torch

from kvserve.config import EngineConfig
from kvserve.engine.llm_engine import LLMEngine
from kvserve.sampling_params import SamplingParams

def profiled_functions(engine: LLMEngine) -> dict[str, object]:
    """The functions whose cumulative time makes each part of the step."""
    from kvserve.layers.attention import Attention
    from kvserve.layers.cpu_linear import CpuLinearKernel
    from kvserve.layers.linear import Linear
    from kvserve.layers.sampler import Sampler

    model = type(engine.executor.worker.model)
    return {
        "step": LLMEngine.step,
        "forward": model.forward,
        "logits": model.compute_logits,
        "linear": Linear.forward,
        "fused silu + down": CpuLinearKernel.silu_and_linear,
        "attention": Attention.forward,
        "sampling": Sampler.__call__,
    }


def cumulative_seconds(stats: pstats.Stats, function: object) -> float:
    """Total time inside ``function`` and everything it calls (through decorators such as ``torch.no_grad``)."""
    code = inspect.unwrap(function).__code__  # type: ignore[attr-defined]
    key = (code.co_filename, code.co_firstlineno, code.co_name)
    entry = stats.stats.get(key)  # type: ignore[attr-defined]
    return 0.0 if entry is None else entry[3]


def start_batch(engine: LLMEngine, batch: int, prompt_len: int, seed: int) -> None:
    rng = random.Random(seed)
    vocab = engine.hf_config.vocab_size
    params = SamplingParams(temperature=0.0, max_tokens=10_000, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"profile-{batch}-{i}", [rng.randrange(vocab) for _ in range(prompt_len)], params)
    engine.step()
    while engine.last_step.num_prefill_tokens:
        engine.step()


def profile(engine: LLMEngine, batch: int, args: argparse.Namespace) -> dict[str, float]:
    start_batch(engine, batch, args.prompt_len, args.seed)
    for _ in range(2):
        engine.step()
    started = time.perf_counter()
    for _ in range(args.steps):
        engine.step()
    wall = (time.perf_counter() - started) / args.steps
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(args.steps):
        engine.step()
    profiler.disable()
    for request_id in list(engine.requests):
        engine.abort_request(request_id)
    stats = pstats.Stats(profiler)
    if args.top:
        stats.sort_stats("tottime").print_stats(args.top)
    t = {part: cumulative_seconds(stats, f) / args.steps for part, f in profiled_functions(engine).items()}
    model = t["forward"] + t["logits"]
    t["linear"] += t["fused silu + down"]
    return {
        "wall_step_s": wall,
        "profiled_step_s": t["step"],
        "linear": t["linear"],
        "attention": t["attention"],
        "other model ops": model - t["linear"] - t["attention"],
        "sampling": t["sampling"],
        "engine overhead": t["step"] - model - t["sampling"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kv-cache-memory-bytes", type=int, default=512 << 20,
                        help="room for batch x (prompt + steps) tokens, or the batch is preempted")
    parser.add_argument("--top", type=int, default=0, help="also print the N functions with the most own time")
    args = parser.parse_args()

    engine = LLMEngine(EngineConfig(model=args.model, dtype=args.dtype, kv_cache_memory_bytes=args.kv_cache_memory_bytes,
                                    max_num_seqs=max(256, max(args.batch_sizes))))
    print(f"{engine.model_path} · {args.dtype} · {torch.get_num_threads()} threads · "
          f"prompt {args.prompt_len} tokens · {args.steps} steps")
    parts = ("linear", "attention", "other model ops", "sampling", "engine overhead")
    print("| batch | step (wall) | step (profiled) | " + " | ".join(parts) + " |")
    print("|---|---|---|" + "---|" * len(parts))
    for batch in args.batch_sizes:
        r = profile(engine, batch, args)
        shares = " | ".join(f"{100 * r[p] / r['profiled_step_s']:.0f}%" for p in parts)
        print(f"| {batch} | {1000 * r['wall_step_s']:.1f} ms | {1000 * r['profiled_step_s']:.1f} ms | {shares} |")


if __name__ == "__main__":
    main()
