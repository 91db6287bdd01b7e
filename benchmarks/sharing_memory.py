"""KV blocks used by n>1 sampling and beam search, with block sharing and without.

With sharing (kvserve): the prompt is prefilled once and every output / beam
forks from it, referencing the same physical blocks; a block is copied only
when a sequence writes into it (copy-on-write). Without sharing: the same
engine, but `fork` gives every new sequence private copies of all its parent's
blocks, which is what an engine that stores each sequence separately holds.
Both runs make the same tokens (checked); only the memory differs.

For each configuration the peak number of blocks held is measured on the real
engine, and the number of such requests that fit side by side in a fixed
cache follows from it (`--verify` runs that many at once and checks that none
is preempted, and one more, which must preempt).

    .venv/bin/python benchmarks/sharing_memory.py [--model DIR] [--prompt-len 512] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from kvserve import LLM, BeamSearchParams, SamplingParams
from kvserve.engine.block_manager import BlockManager

STORIES = Path(__file__).resolve().parents[2] / "shared" / "models" / "stories260K"


class CopyingBlockManager(BlockManager):
    """`fork` copies every block of the parent into fresh blocks instead of sharing them."""

    def fork(self, parent_id: int, child_id: int) -> None:
        table = self.block_table(parent_id)
        if len(table) > self.num_free_blocks:
            raise RuntimeError("the cache is too small for the unshared run; raise --cache-blocks")
        copies = []
        for block_id in table:
            copy = self._take_free()
            self.pending_copies.append((block_id, copy.block_id))
            copies.append(copy.block_id)
        self._tables[child_id] = copies


@dataclass
class Run:
    peak_blocks: int
    tokens: list[list[list[int]]]  # per request, per output
    preemptions: int
    seconds: float


def model_dir(source: Path, context: int) -> Path:
    """A copy of `source` whose context length fits the prompt plus the outputs."""
    target = Path(tempfile.mkdtemp(prefix="kvserve-sharing-")) / source.name
    shutil.copytree(source, target)
    config_path = target / "config.json"
    config = json.loads(config_path.read_text())
    config["max_position_embeddings"] = max(config.get("max_position_embeddings", 0), context)
    config_path.write_text(json.dumps(config))
    return target


def run(model: Path, params: SamplingParams | BeamSearchParams, prompt: list[int], num_requests: int, cache_blocks: int, block_size: int, share: bool) -> Run:
    llm = LLM(str(model), dtype="float32", block_size=block_size, num_gpu_blocks_override=cache_blocks,
              enable_prefix_caching=False, max_num_seqs=4096, max_num_batched_tokens=65536)
    engine = llm.llm_engine
    if not share:
        engine.scheduler.block_manager = CopyingBlockManager(cache_blocks, block_size, False)
    bm = engine.scheduler.block_manager
    peak = 0
    schedule = engine.scheduler.schedule

    def measured_schedule():
        nonlocal peak
        batch = schedule()
        peak = max(peak, bm.num_blocks - bm.num_free_blocks)
        return batch

    engine.scheduler.schedule = measured_schedule
    started = time.perf_counter()
    prompts = [list(prompt) for _ in range(num_requests)]
    if isinstance(params, BeamSearchParams):
        tokens = [[b.output_token_ids for b in o.sequences] for o in llm.beam_search(prompts, params)]
    else:
        tokens = [[c.token_ids for c in o.outputs] for o in llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)]
    assert bm.num_free_blocks == cache_blocks, "blocks leaked"
    return Run(peak, tokens, engine.stats().num_preemptions, time.perf_counter() - started)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=STORIES)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--cache-blocks", type=int, default=2048, help="the fixed cache the capacity column refers to")
    parser.add_argument("--verify", action="store_true", help="run the computed number of concurrent requests (and one more)")
    args = parser.parse_args(argv)

    model = model_dir(args.model, args.prompt_len + args.max_tokens)
    rng = random.Random(0)
    prompt = [rng.randrange(3, 500) for _ in range(args.prompt_len)]
    configs: list[tuple[str, SamplingParams | BeamSearchParams]] = [
        (f"n={n}", SamplingParams(n=n, temperature=1.0, seed=0, max_tokens=args.max_tokens, ignore_eos=True)) for n in (1, 2, 4, 8)
    ] + [
        (f"beam={w}", BeamSearchParams(beam_width=w, max_tokens=args.max_tokens, ignore_eos=True)) for w in (2, 4, 8)
    ]
    prompt_blocks = -(-args.prompt_len // args.block_size)
    print(f"model {args.model.name}, prompt {args.prompt_len} tokens ({prompt_blocks} blocks of {args.block_size}), "
          f"{args.max_tokens} new tokens per sequence, fixed cache {args.cache_blocks} blocks\n")
    header = "| request | sequences | peak KV blocks, shared | peak KV blocks, unshared | saving | requests that fit, shared | requests that fit, unshared | same tokens |"
    if args.verify:
        header += " preemptions with fit / fit+1 requests at once (shared) |"
    print(header)
    print("|---" * header.count(" | ") + "|---|")
    for name, params in configs:
        shared = run(model, params, prompt, 1, args.cache_blocks, args.block_size, share=True)
        unshared = run(model, params, prompt, 1, args.cache_blocks, args.block_size, share=False)
        width = params.beam_width if isinstance(params, BeamSearchParams) else params.n
        fit_shared = args.cache_blocks // shared.peak_blocks
        fit_unshared = args.cache_blocks // unshared.peak_blocks
        same = shared.tokens == unshared.tokens
        row = (f"| {name} | {width} | {shared.peak_blocks} | {unshared.peak_blocks} | {unshared.peak_blocks / shared.peak_blocks:.2f}x "
               f"| {fit_shared} | {fit_unshared} | {'yes' if same else 'NO'} |")
        if args.verify:
            at_capacity = run(model, params, prompt, fit_shared, args.cache_blocks, args.block_size, share=True)
            over = run(model, params, prompt, fit_shared + 1, args.cache_blocks, args.block_size, share=True)
            row += f" {at_capacity.preemptions} / {over.preemptions} |"
        print(row, flush=True)
    shutil.rmtree(model.parent, ignore_errors=True)


if __name__ == "__main__":
    main()
