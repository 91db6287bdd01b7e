"""Speculative decoding (prompt lookup, or a draft model) against plain decoding, on the same model, in one run.

Single stream, greedy, on two kinds of task: grounded (the answer copies much of the prompt: repeat a
passage of Genesis, and repeat a Python function) and free (a story). Then
batches of 16 and 64 requests (the grounded prompts, sampled), where speculation turns itself off above
`max_batch_size` and the question is that it never costs much. Each measurement alternates the two
engines, `--repeats` times, and reports the median; the ratio is speculative / plain.

    PYTHONPATH=src python benchmarks/spec_decode.py [--model FILE] [--k 5] [--repeats 3] [--output FILE.json]
        [--draft MODEL | --draft-layers N] [--quantization none] [--draft-quantization auto]

`--draft` speculates with a draft model instead of prompt lookup; `--draft-layers N` makes one from the
target GGUF's first N layers (kvserve.bench.gguf_truncate). `--quantization none --draft DEFAULT.gguf
--draft-quantization auto` runs the dequantized default model with its own Q4_1 blocks as the draft.

The passages come from benchmarks/data/kjv_genesis.txt (public domain; see the README beside it) and from
this project's own source.
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import tempfile
import time
from pathlib import Path

from kvserve import LLM, SamplingParams
from kvserve.engine import block_manager

GENESIS = (Path(__file__).parent / "data" / "kjv_genesis.txt").read_text()


def _tasks() -> dict[str, list[dict[str, str]]]:
    passage = GENESIS[:900]
    code = inspect.getsource(block_manager.BlockManager.allocate)[:1200]
    return {
        "grounded: repeat Genesis": [{"role": "user", "content": "Copy this text exactly:\n\n" + passage}],
        "grounded: repeat code": [{"role": "user", "content": "Repeat this Python function exactly:\n\n" + code}],
        "free: a story": [{"role": "user", "content": "Write a short story about a lighthouse keeper and a storm."}],
    }


def _timed(llm: LLM, conversations: list[list[dict[str, str]]], params: SamplingParams) -> tuple[float, int]:
    start = time.perf_counter()
    outs = llm.chat(conversations, params, use_tqdm=False)
    return time.perf_counter() - start, sum(len(o.outputs[0].token_ids) for o in outs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: the built-in default model")
    parser.add_argument("--k", type=int, default=3, help="num_speculative_tokens (default: %(default)s)")
    parser.add_argument("--lookup-max", type=int, default=4, help="prompt_lookup_max (default: %(default)s)")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--batch-sizes", type=int, nargs="*", default=[16, 64])
    parser.add_argument("--max-batch-size", type=int, default=None,
                        help="speculate in steps of up to this many sequences (default: the config's); raise it to find the crossover")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", default=None, help="write the results as JSON")
    parser.add_argument("--draft", default=None, help="a draft model (method draft_model) instead of prompt lookup")
    parser.add_argument("--draft-layers", type=int, default=None, help="draft: the target GGUF's first N layers")
    parser.add_argument("--quantization", default="auto", help="both engines' weights (default: %(default)s)")
    parser.add_argument("--draft-quantization", default=None, help="the draft's weights (default: as the target's)")
    args = parser.parse_args()

    spec_config = {"method": "ngram", "num_speculative_tokens": args.k, "prompt_lookup_max": args.lookup_max}
    draft = args.draft
    if args.draft_layers is not None:
        from kvserve.bench.gguf_truncate import truncate_gguf
        from kvserve.models.loader import resolve_model_path

        draft = truncate_gguf(resolve_model_path(args.model), f"{tempfile.mkdtemp()}/draft-{args.draft_layers}.gguf", args.draft_layers)
    if draft is not None:
        spec_config = {"model": draft, "num_speculative_tokens": args.k, "quantization": args.draft_quantization}
    if args.max_batch_size is not None:
        spec_config["max_batch_size"] = args.max_batch_size
    engines = {"plain": LLM(args.model, quantization=args.quantization),
               "spec": LLM(args.model, quantization=args.quantization, speculative_config=spec_config)}
    tasks = _tasks()
    greedy = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    rows = []

    def measure(name: str, conversations: list[list[dict[str, str]]], params: SamplingParams) -> None:
        for llm in engines.values():
            _timed(llm, conversations[:2], SamplingParams(temperature=0.0, max_tokens=8))  # warm the kernels and threads
        speeds: dict[str, list[float]] = {label: [] for label in engines}
        before = engines["spec"].llm_engine.stats().spec_decode
        for _ in range(args.repeats):
            for label, llm in engines.items():
                seconds, tokens = _timed(llm, conversations, params)
                speeds[label].append(tokens / seconds)
        after = engines["spec"].llm_engine.stats().spec_decode
        drafts, proposed, accepted = (after.num_drafts - before.num_drafts, after.num_draft_tokens - before.num_draft_tokens,
                                      after.num_accepted_tokens - before.num_accepted_tokens)
        row = {
            "task": name, "requests": len(conversations),
            "plain_tok_s": statistics.median(speeds["plain"]), "spec_tok_s": statistics.median(speeds["spec"]),
            "acceptance_rate": accepted / proposed if proposed else None,
            "mean_acceptance_length": 1 + accepted / drafts if drafts else None,
        }
        row["ratio"] = row["spec_tok_s"] / row["plain_tok_s"]
        rows.append(row)
        rate = "-" if row["acceptance_rate"] is None else f"{row['acceptance_rate']:.2f}"
        length = "-" if row["mean_acceptance_length"] is None else f"{row['mean_acceptance_length']:.2f}"
        print(f"{name:28s} x{len(conversations):<3d} plain {row['plain_tok_s']:7.1f} tok/s  spec {row['spec_tok_s']:7.1f} tok/s  "
              f"ratio {row['ratio']:.2f}  acceptance {rate}  tokens/step {length}", flush=True)

    for name, conversation in tasks.items():
        measure(name, [conversation], greedy)
    grounded = [c for name, c in tasks.items() if name.startswith("grounded")]
    sampled = SamplingParams(temperature=0.7, max_tokens=args.max_tokens // 2)
    for batch in args.batch_sizes:
        measure(f"batch of {batch}, grounded", [grounded[i % len(grounded)] for i in range(batch)], sampled)
    if args.output:
        Path(args.output).write_text(json.dumps({"config": spec_config, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
