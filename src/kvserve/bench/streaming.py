"""`kvserve bench streaming`: StreamingLLM's perplexity experiment (Xiao et al., 2023, Figure 3) on one long text.

The text's first ``--num-tokens`` tokens are scored, each token's negative log-likelihood (log-perplexity)
given what the method lets it see, four ways:

- ``dense``: full attention over everything before it, in one request of at most ``max_model_len − 1``
  tokens (dense attention past the model's context is not scored);
- ``window``: ``--sliding-window W`` without sinks, the whole text as one streamed request;
- ``sinks_window``: the first ``--attention-sinks S`` tokens plus the last W, one streamed request;
- ``window_recompute``: the paper's baseline, the model run afresh over the W tokens before each scored
  token (one request of W + 1 tokens per position, positions 0..W); correct but O(N·W). For a token
  with at most W before it that is exactly dense attention, so those positions are dense's.
  ``--recompute-stride K`` scores only every K-th position past W, to cap its cost on long texts.

The first three read the engine's prompt logprobs (``SamplingParams(prompt_logprobs=0)``) in one pass
(chunked prefill; a streamed prompt may be longer than ``max_model_len``). Reported: the mean
log-perplexity per position bucket of each method (a table, printed, and the per-position values in
the JSON), a plot of the buckets, and the decode speed of ``sinks_window`` against ``window_recompute``
at the same W: ``--decode-tokens`` greedy tokens after the text's first 2W tokens, streamed in one
request against one fresh request over the last W tokens per token.
"""

from __future__ import annotations

import argparse
import gc
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from kvserve.bench.kvserve_runner import KvserveRunner, greedy
from kvserve.bench.report import command_line, load_average, run_context, text_table, write_json
from kvserve.config import EngineConfig
from kvserve.engine_args import add_engine_arguments, engine_config_from_args
from kvserve.entrypoints.llm import LLM
from kvserve.sampling_params import SamplingParams

PROG = "kvserve bench streaming"
DEFAULT_TEXT = Path(__file__).resolve().parents[3] / "benchmarks" / "data" / "kjv_genesis.txt"
METHODS = ("dense", "window", "sinks_window", "window_recompute")
LABELS = {"dense": "dense attention", "window": "window, no sinks", "sinks_window": "sinks + window",
          "window_recompute": "window with recompute"}
SCORE = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)


def add_bench_streaming_arguments(parser: argparse.ArgumentParser) -> None:
    add_engine_arguments(parser)
    parser.set_defaults(sliding_window=128, attention_sinks=4)
    g = parser.add_argument_group("experiment")
    g.add_argument("--text", type=Path, default=DEFAULT_TEXT, help="the text to score (default: %(default)s)")
    g.add_argument("--num-tokens", type=int, default=4000, help="score the text's first N tokens (default: %(default)s)")
    g.add_argument("--bucket", type=int, default=256, help="positions per table row and plot point (default: %(default)s)")
    g.add_argument("--recompute-stride", type=int, default=1,
                   help="window with recompute scores every K-th position past W (default: %(default)s, all)")
    g.add_argument("--decode-tokens", type=int, default=128,
                   help="greedy tokens generated to time sinks + window against recompute (default: %(default)s)")
    out = parser.add_argument_group("output")
    out.add_argument("--output", default=None, metavar="JSON", help="write the report here")
    out.add_argument("--plot", default=None, metavar="PNG", help="save the perplexity-per-position plot here")
    parser.set_defaults(bench_parser=parser)


@dataclass
class Experiment:
    """The scored tokens, the window every windowed method uses, and how much the slow baseline runs."""

    token_ids: list[int]
    window: int
    sinks: int
    recompute_stride: int = 1
    decode_tokens: int = 128

    def __post_init__(self) -> None:
        if len(self.token_ids) < 2:
            raise ValueError(f"the text has {len(self.token_ids)} tokens; at least 2 are needed to score one")
        if self.recompute_stride < 1 or self.decode_tokens < 2:
            raise ValueError("--recompute-stride must be >= 1 and --decode-tokens >= 2")

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    def empty(self) -> np.ndarray:
        """Per-position negative log-likelihoods, NaN where not scored (position 0 never is)."""
        return np.full(self.num_tokens, np.nan)


def streamed_nll(llm: LLM, experiment: Experiment, length: int | None = None) -> np.ndarray:
    """Each position's negative log-likelihood from one request over the text's first `length` tokens."""
    ids = experiment.token_ids[:length]
    out = llm.generate(prompt_token_ids=[ids], sampling_params=SCORE, use_tqdm=False)[0]
    nll = experiment.empty()
    nll[1 : len(ids)] = [-entry[token].logprob for token, entry in zip(ids[1:], out.prompt_logprobs[1:])]
    return nll


def recompute_nll(llm: LLM, experiment: Experiment, dense: np.ndarray) -> np.ndarray:
    """Window with recompute: position i > W scored by a fresh request over tokens i − W .. i − 1; i <= W is dense.

    The request generates one token restricted to the text's next token (`allowed_token_ids`); the logprob the
    engine reports is the raw model's, so this scores that token with logits for the last position only, not
    for all W of them as prompt logprobs would (over a 49k vocabulary that was most of the cost)."""
    ids, w = experiment.token_ids, experiment.window
    nll = experiment.empty()
    nll[: w + 1] = dense[: w + 1]
    positions = list(range(w + 1, experiment.num_tokens, experiment.recompute_stride))
    if positions:
        params = [SamplingParams(max_tokens=1, temperature=0.0, logprobs=0, allowed_token_ids=[ids[i]]) for i in positions]
        outputs = llm.generate(prompt_token_ids=[ids[i - w : i] for i in positions], sampling_params=params, use_tqdm=False)
        nll[positions] = [-out.outputs[0].logprobs[0][ids[i]].logprob for i, out in zip(positions, outputs)]
    return nll


def streamed_decode_tokens_per_s(runner: KvserveRunner, experiment: Experiment) -> float:
    """Greedy decode speed of one request streaming on after the text's first 2W tokens."""
    prompt = experiment.token_ids[: 2 * experiment.window]
    return 1 / runner.stream(prompt, experiment.decode_tokens).decode_step_s


def recompute_decode_tokens_per_s(llm: LLM, experiment: Experiment) -> float:
    """Greedy decode speed when every token is a fresh request over the W tokens before it."""
    tokens = list(experiment.token_ids[: 2 * experiment.window])
    started = time.perf_counter()
    for _ in range(experiment.decode_tokens):  # the baseline recomputes the window for every token, by design
        out = llm.generate(prompt_token_ids=[tokens[-experiment.window :]], sampling_params=greedy(1), use_tqdm=False)
        tokens.append(out[0].outputs[0].token_ids[0])
    return experiment.decode_tokens / (time.perf_counter() - started)


def bucket_means(nll: np.ndarray, bucket: int) -> list[float | None]:
    """Mean of the scored positions in each run of `bucket` positions (None where none was scored)."""
    means = []
    for lo in range(0, len(nll), bucket):
        scored = nll[lo : lo + bucket][~np.isnan(nll[lo : lo + bucket])]
        means.append(float(scored.mean()) if scored.size else None)
    return means


def _load(config: EngineConfig) -> KvserveRunner:
    gc.collect()  # the previous method's engine and its KV cache go first
    return KvserveRunner.from_config(config)


def run_experiment(config: EngineConfig, text: str, num_tokens: int, recompute_stride: int = 1,
                   decode_tokens: int = 128) -> tuple[Experiment, dict[str, Any]]:
    """The experiment on the first `num_tokens` tokens of `text` (tokenized as the model's tokenizer does by
    default, its BOS included) at `config`'s window and sinks, and its results: per-position log-perplexities
    of the four methods, seconds spent scoring each, and the two decode speeds."""
    if config.sliding_window is None:
        raise ValueError("kvserve bench streaming needs --sliding-window W")
    nll: dict[str, np.ndarray] = {}
    seconds: dict[str, float] = {}
    tokens_per_s: dict[str, float] = {}

    runner = _load(replace(config, sliding_window=None, attention_sinks=0))
    experiment = Experiment(runner.llm.get_tokenizer()(text).input_ids[:num_tokens], config.sliding_window,
                            config.attention_sinks, recompute_stride, decode_tokens)
    max_model_len = runner.engine.config.max_model_len
    if experiment.window + 1 >= max_model_len:
        raise ValueError(f"window with recompute runs prompts of W + 1 = {experiment.window + 1} tokens densely; the "
                         f"model's max_model_len is {max_model_len}: use a smaller --sliding-window")
    started = time.perf_counter()
    nll["dense"] = streamed_nll(runner.llm, experiment, max_model_len - 1)  # a prompt leaves room for one token
    seconds["dense"] = time.perf_counter() - started
    started = time.perf_counter()
    nll["window_recompute"] = recompute_nll(runner.llm, experiment, nll["dense"])
    seconds["window_recompute"] = time.perf_counter() - started
    tokens_per_s["window_recompute"] = recompute_decode_tokens_per_s(runner.llm, experiment)
    del runner

    for method, sinks in (("window", 0), ("sinks_window", experiment.sinks)):
        runner = _load(replace(config, attention_sinks=sinks))
        started = time.perf_counter()
        nll[method] = streamed_nll(runner.llm, experiment)
        seconds[method] = time.perf_counter() - started
        if method == "sinks_window":
            tokens_per_s[method] = streamed_decode_tokens_per_s(runner, experiment)
            settings = runner.settings()
        del runner
    return experiment, {"max_model_len": max_model_len, "settings": settings, "nll": nll, "seconds": seconds,
                        "decode_tokens_per_s": tokens_per_s}


def _json_floats(values: np.ndarray) -> list[float | None]:
    return [None if math.isnan(v) else round(v, 5) for v in values.tolist()]


def _mean(nll: np.ndarray) -> float:
    """Mean over the scored positions."""
    return float(np.nanmean(nll))


def same_positions_means(nll: dict[str, np.ndarray], window: int) -> dict[str, float | None]:
    """Each method's mean over the positions past W that recompute scored (with `--recompute-stride` > 1 the
    bucket means compare different positions; these compare the same ones)."""
    scored = ~np.isnan(nll["window_recompute"])
    scored[: window + 1] = False
    return {method: float(np.mean(values[scored])) if scored.any() and not np.isnan(values[scored]).any() else None
            for method, values in nll.items()}


def _cell(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def table_rows(buckets: dict[str, list[float | None]], bucket: int, num_tokens: int) -> list[list[str]]:
    """One row per bucket: its positions, then each method's mean log-perplexity."""
    return [[f"{lo}–{min(lo + bucket, num_tokens) - 1}", *(_cell(buckets[m][i]) for m in METHODS)]
            for i, lo in enumerate(range(0, num_tokens, bucket))]


def plot(buckets: dict[str, list[float | None]], bucket: int, window: int, max_model_len: int, path: Path,
         title: str) -> None:
    """Log-perplexity per position bucket, one line per method (Agg canvas, no pyplot state)."""
    figure = Figure(figsize=(8, 4.5), layout="constrained")
    ax = figure.subplots()
    centers = np.arange(len(buckets["dense"])) * bucket + bucket / 2
    for method in METHODS:
        values = np.array([np.nan if v is None else v for v in buckets[method]])
        ax.plot(centers, values, marker=".", label=LABELS[method])
    ax.axvline(window, color="grey", linestyle=":", linewidth=1)
    ax.axvline(max_model_len, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel(f"position in the text (mean over {bucket} positions; dotted: W, dashed: the model's context)")
    ax.set_ylabel("log-perplexity (mean NLL, nats)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)


def run_bench_streaming(args: argparse.Namespace) -> int:
    if args.bucket < 1:
        raise ValueError(f"--bucket must be >= 1, got {args.bucket}")
    context = run_context(command_line(PROG, args.bench_parser, args))
    experiment, result = run_experiment(engine_config_from_args(args), args.text.read_text(), args.num_tokens,
                                        args.recompute_stride, args.decode_tokens)
    context["load_average_1min_end"] = load_average()
    buckets = {method: bucket_means(result["nll"][method], args.bucket) for method in METHODS}
    speed = result["decode_tokens_per_s"]
    report = {
        **context,
        "settings": result["settings"],
        "text": args.text.name, "num_tokens": experiment.num_tokens, "window": experiment.window,
        "attention_sinks": experiment.sinks, "max_model_len": result["max_model_len"],
        "recompute_stride": experiment.recompute_stride, "bucket": args.bucket,
        "buckets": [{"start": lo, "end": min(lo + args.bucket, experiment.num_tokens),
                     **{method: buckets[method][i] for method in METHODS}}
                    for i, lo in enumerate(range(0, experiment.num_tokens, args.bucket))],
        "mean_log_perplexity": {method: _mean(result["nll"][method]) for method in METHODS},
        "mean_at_recompute_positions": same_positions_means(result["nll"], experiment.window),
        "scoring_seconds": result["seconds"],
        "scored_positions": {method: int(np.count_nonzero(~np.isnan(result["nll"][method]))) for method in METHODS},
        "decode_tokens": experiment.decode_tokens,
        "decode_tokens_per_s": speed,
        "sinks_window_speedup_over_recompute": speed["sinks_window"] / speed["window_recompute"],
        "per_position_nll": {method: _json_floats(result["nll"][method]) for method in METHODS},
    }
    title = (f"{Path(result['settings']['model_path']).name}: W = {experiment.window}, S = {experiment.sinks}, "
             f"{experiment.num_tokens} tokens of {args.text.name}")
    print(title)
    print(text_table(["positions", *(LABELS[m] for m in METHODS)],
                     [*table_rows(buckets, args.bucket, experiment.num_tokens),
                      ["all scored", *(_cell(report["mean_log_perplexity"][m]) for m in METHODS)],
                      ["recompute's positions", *(_cell(report["mean_at_recompute_positions"][m]) for m in METHODS)]]))
    print(f"decode, W = {experiment.window}: sinks + window {speed['sinks_window']:.1f} tok/s, window with "
          f"recompute {speed['window_recompute']:.1f} tok/s ({report['sinks_window_speedup_over_recompute']:.1f}×)")
    recomputed = result["nll"]["window_recompute"][experiment.window + 1 :]  # before that it is dense's
    timed = {"sinks_window": report["scored_positions"]["sinks_window"],
             "window_recompute": int(np.count_nonzero(~np.isnan(recomputed)))}
    scoring = {method: timed[method] / result["seconds"][method] for method in timed}
    report["scoring_positions_per_s"] = scoring
    print(f"scoring the text: sinks + window {scoring['sinks_window']:.0f} positions/s, window with recompute "
          f"{scoring['window_recompute']:.0f} positions/s (its positions up to W are dense's, not timed)")
    if args.output:
        write_json(args.output, report)
    if args.plot:
        plot(buckets, args.bucket, experiment.window, result["max_model_len"], Path(args.plot), title)
    return 0
