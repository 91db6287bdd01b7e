"""Tensor, pipeline and data parallel against one rank, on this machine, in one run.

    python benchmarks/parallel_scaling.py [--model M] [--configs tp1,tp2,pp2,pp2-nomb,dp2]

The default model is SmolLM2-135M's shape with random weights and 12 heads of 48 (4 KV heads) in
place of its 9 of 64 (same hidden size, same q/k/v/o sizes and bytes), because 9 heads do not
split over 2 ranks.

For each configuration: single-stream decode (a 128-token prompt, 128 new tokens: tok/s after
the first token) and a W1-like batch (32 prompts of 32-512 tokens, 64 out: total tok/s), with
what each rank spent where, read from the ranks themselves (`WorkerInfo`): the share of its busy
time inside all-reduces / all-gathers (tensor parallel) and, for a pipeline, each stage's busy
share of the wall time and its wait for the previous stage (the bubble). Every configuration
gets the same cores (all of them) and the same weights format; ratios are against tp1 in the
same run. Prints a markdown table (docs/PERFORMANCE.md, "Parallel inference on one machine").
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace

from kvserve import LLM, SamplingParams
from kvserve.bench.workload import random_workload
from kvserve.estimate.dummy_model import write_dummy_model_dir
from kvserve.estimate.presets import get_preset

CONFIGS = {
    "tp1": {},
    "tp2": {"tensor_parallel_size": 2},
    "pp2": {"pipeline_parallel_size": 2},
    "pp2-nomb": {"pipeline_parallel_size": 2, "pipeline_micro_batching": False},
    "dp2": {"data_parallel_size": 2},
}


def comm_seconds(infos: list) -> list[dict[str, float]]:
    return [dict(info.comm.seconds) if info.comm is not None else {} for info in infos]


def run(name: str, model: str, load_format: str, vocab: int) -> dict:
    llm = LLM(model, load_format=load_format, quantization="none", kv_cache_memory_bytes=256 << 20, **CONFIGS[name])
    engine = llm.llm_engine
    try:
        greedy = SamplingParams(temperature=0.0, max_tokens=128, ignore_eos=True)
        prompt = random_workload(1, (128, 128), (1, 1), vocab, seed=1).requests[0].prompt_token_ids
        llm.generate(prompt_token_ids=[prompt], sampling_params=SamplingParams(max_tokens=8, ignore_eos=True), use_tqdm=False)
        before = engine.rank_infos()
        started = time.perf_counter()
        first = None
        engine.add_request("single", prompt, greedy)
        while engine.has_unfinished_requests():
            for out in engine.step():
                if first is None and out.outputs[0].token_ids:
                    first = time.perf_counter()
        single = 127 / (time.perf_counter() - first)
        after = engine.rank_infos()
        single_comm = _share(before, after)

        work = random_workload(32, (32, 512), (64, 64), vocab, seed=0)
        prompts = [r.prompt_token_ids for r in work.requests]
        params = [SamplingParams(temperature=0.0, max_tokens=r.output_len, ignore_eos=True) for r in work.requests]
        before = engine.rank_infos()
        started = time.perf_counter()
        llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
        wall = time.perf_counter() - started
        after = engine.rank_infos()
        batch = (work.num_prompt_tokens + work.num_output_tokens) / wall
        busy = [(a.busy_seconds - b.busy_seconds) / wall for a, b in zip(after, before)]
        return {"name": name, "single_tok_s": single, "batch_tok_s": batch, "single_comm": single_comm,
                "batch_comm": _share(before, after), "busy": busy, "ranks": len(after)}
    finally:
        engine.shutdown()


def _share(before: list, after: list) -> str:
    """Per rank: communication (and pipeline waits) as a share of its busy time."""
    parts = []
    for b, a in zip(before, after):
        busy = a.busy_seconds - b.busy_seconds
        cb, ca = (b.comm.seconds if b.comm else {}), (a.comm.seconds if a.comm else {})
        spent = {k: ca[k] - cb.get(k, 0.0) for k in ca}
        if busy > 0 and spent:
            parts.append(" ".join(f"{k} {100 * v / busy:.0f}%" for k, v in sorted(spent.items())))
    return "; ".join(parts) or "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a model directory (default: SmolLM2's shape with 12 heads, random weights)")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    args = parser.parse_args()
    model, load_format, vocab = args.model, "auto", 512
    if model is None:
        shape = replace(get_preset("smollm2-135m"), num_heads=12, num_kv_heads=4, head_dim=48)
        model, load_format, vocab = str(write_dummy_model_dir(shape, tempfile.mkdtemp())), "dummy", shape.vocab_size
    rows = [run(name, model, load_format, vocab) for name in args.configs.split(",")]
    base = rows[0]
    print("| config | ranks | single stream tok/s | vs tp1 | comm share (single) | W1-like tok/s | vs tp1 | comm share (W1) | busy share of wall (W1) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['ranks']} | {r['single_tok_s']:.1f} | {r['single_tok_s'] / base['single_tok_s']:.2f}x | "
              f"{r['single_comm']} | {r['batch_tok_s']:.1f} | {r['batch_tok_s'] / base['batch_tok_s']:.2f}x | {r['batch_comm']} | "
              f"{' / '.join(f'{100 * b:.0f}%' for b in r['busy'])} |")


if __name__ == "__main__":
    main()
