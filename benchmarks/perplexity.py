"""Perplexity of a model on a fixed public-domain text, through the engine: what quantization costs in accuracy.

    python benchmarks/perplexity.py [--model M] [--dtype bfloat16] [--quantization auto|none] [--window 1024]
                                    [--kv-cache-dtype auto|int8|fp8_e4m3]

The text is benchmarks/data/kjv_genesis.txt (README.md beside it says where it comes from). It is cut
into consecutive windows of `--window` tokens; each window is one request whose prompt logprobs
(`SamplingParams(prompt_logprobs=0)`) score its tokens from position `--first-scored` on (default 1:
all but the first) given the ones before it in the window; `--first-scored 512` with `--window 1024`
is llama.cpp's `llama-perplexity -c 1024` (the second half of each chunk). Perplexity = exp(mean
negative log-likelihood over the scored tokens). Any engine option
(`--dtype`, `--quantization`, `--kv-cache-dtype`, ...) can be set, so two runs differ only in what is
measured. With an int8 / fp8 KV cache every window's keys and values are read back quantized, its
own chunk's included (the kernel attends over the cache it has just written).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from kvserve import LLM, SamplingParams
from kvserve.engine_args import add_engine_arguments, engine_config_from_args

TEXT = Path(__file__).parent / "data" / "kjv_genesis.txt"


def perplexity(llm: LLM, token_ids: list[int], window: int, first_scored: int = 1) -> tuple[float, int]:
    """(perplexity, tokens scored) of `token_ids` in windows of `window` tokens, each scored from `first_scored` on."""
    windows = [token_ids[i : i + window] for i in range(0, len(token_ids), window)]
    windows = [w for w in windows if len(w) > first_scored]
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0)
    outputs = llm.generate(prompt_token_ids=windows, sampling_params=params, use_tqdm=False)
    nll, count = 0.0, 0
    for ids, out in zip(windows, outputs):
        for token, entry in zip(ids[first_scored:], out.prompt_logprobs[first_scored:]):
            nll -= entry[token].logprob
            count += 1
    return math.exp(nll / count), count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--window", type=int, default=1024, help="tokens per scored window (default: %(default)s)")
    parser.add_argument("--first-scored", type=int, default=1, help="first window position scored (default: %(default)s)")
    parser.add_argument("--max-tokens", type=int, default=None, help="score only the text's first N tokens")
    parser.add_argument("--output", default=None, help="write the result as JSON")
    add_engine_arguments(parser)
    args = parser.parse_args()
    config = engine_config_from_args(args)
    llm = LLM(**{k: v for k, v in vars(config).items() if k not in ("hf_config", "torch_dtype")})
    ids = llm.get_tokenizer()(TEXT.read_text(), add_special_tokens=False).input_ids[: args.max_tokens]
    started = time.perf_counter()
    value, count = perplexity(llm, ids, min(args.window, llm.llm_engine.config.max_model_len), args.first_scored)
    engine = llm.llm_engine
    plan = engine.worker_info.kernel_plan
    result = {
        "model": engine.model_path, "dtype": str(engine.config.torch_dtype).removeprefix("torch."),
        "quantization": engine.config.quantization, "kv_cache_dtype": engine.config.kv_cache_dtype,
        "linear": plan.describe_linear() if plan else None,
        "text": TEXT.name, "window": args.window, "first_scored": args.first_scored, "tokens_scored": count, "perplexity": value,
        "seconds": time.perf_counter() - started, "command": " ".join(["python", *sys.argv]),
    }
    print(json.dumps(result, indent=1))
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
