"""The `kvserve` command: generate, chat, serve, estimate, bench."""

from __future__ import annotations

import argparse
import io
import logging
import os
import sys
from typing import Any

from kvserve import __version__
from kvserve.engine_args import add_engine_arguments, engine_config_from_args
from kvserve.entrypoints.lazy_command import LazyCommand, LazyCommandParser

SERVE = LazyCommand("OpenAI-compatible HTTP server",
                    "kvserve.entrypoints.openai.server", "add_serve_arguments", "run_serve")
ESTIMATE = LazyCommand("memory, concurrency and roofline latency estimates",
                       "kvserve.estimate.cli", "add_estimate_arguments", "run_estimate")
# Every benchmark needs the [bench] extra: httpx for the HTTP clients and peers, matplotlib for the plots.
BENCH_COMMANDS = {
    "serve": LazyCommand("load a running server like vLLM's serving benchmark",
                         "kvserve.bench.serve", "add_bench_serve_arguments", "run_bench_serve", extra="bench"),
    "throughput": LazyCommand("offline throughput, side by side with transformers and llama.cpp",
                              "kvserve.bench.throughput", "add_bench_throughput_arguments", "run_bench_throughput",
                              extra="bench"),
    "latency": LazyCommand("single-stream TTFT and decode speed, side by side",
                           "kvserve.bench.latency", "add_bench_latency_arguments", "run_bench_latency", extra="bench"),
    "ablation": LazyCommand("each optimization off and on: tables and plots",
                            "kvserve.bench.ablation", "add_bench_ablation_arguments", "run_bench_ablation",
                            extra="bench"),
    "streaming": LazyCommand("StreamingLLM's experiment: perplexity per position, dense / window / sinks / recompute",
                             "kvserve.bench.streaming", "add_bench_streaming_arguments", "run_bench_streaming",
                             extra="bench"),
}


# Where neither a flag nor the model's generation_config.json (--generation-config) says otherwise: greedy, 128 tokens
CLI_SAMPLING_DEFAULTS = {"max_tokens": 128, "temperature": 0.0}
_SAMPLING_FLAGS = ("max_tokens", "temperature", "top_p", "top_k")


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("sampling (defaults: the model's generation_config.json, else greedy, 128 tokens)")
    g.add_argument("--max-tokens", type=int, default=None)
    g.add_argument("--temperature", type=float, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--ignore-eos", action="store_true", help="go on past the end-of-sequence token, to --max-tokens")


def sampling_params_from_args(args: argparse.Namespace, model_defaults: dict[str, Any] | None = None) -> Any:
    """The flags given, over `model_defaults` (the engine's `sampling_defaults`), over CLI_SAMPLING_DEFAULTS.
    Without `model_defaults` it checks the flags before a model loads."""
    from kvserve.sampling_params import SamplingParams

    given = {name: getattr(args, name) for name in _SAMPLING_FLAGS if getattr(args, name) is not None}
    return SamplingParams(**{**CLI_SAMPLING_DEFAULTS, **(model_defaults or {}), **given}, seed=args.seed,
                          ignore_eos=args.ignore_eos)


def cmd_generate(args: argparse.Namespace) -> int:
    from kvserve.engine.data_parallel_engine import make_engine
    from kvserve.entrypoints.chat import chat_prompt_ids, stream_reply

    sampling_params_from_args(args)  # bad sampling values fail before the model loads
    engine = make_engine(engine_config_from_args(args))
    params = sampling_params_from_args(args, engine.sampling_defaults)
    # under torchrun every rank runs this command; rank 0 alone prints
    out = sys.stdout if int(os.environ.get("RANK", "0")) == 0 else io.StringIO()
    if args.chat:
        prompt: Any = chat_prompt_ids(engine.tokenizer, [{"role": "user", "content": args.prompt}])
    else:
        prompt = args.prompt
        out.write(args.prompt)
    final = stream_reply(engine, "generate-0", prompt, params, out)
    out.write("\n")
    engine.shutdown()
    assert final is not None  # nothing interrupts it
    if final.error is not None:
        print(f"kvserve: error: {final.error}", file=sys.stderr)
        return 1
    if args.verbose:
        print(f"[{len(final.outputs[0].token_ids)} tokens, finish_reason={final.outputs[0].finish_reason}]", file=sys.stderr)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from kvserve.engine.data_parallel_engine import make_engine
    from kvserve.entrypoints.chat import StreamReader, TerminalReader, run_chat_session

    sampling_params_from_args(args)  # bad sampling values fail before the model loads
    engine = make_engine(engine_config_from_args(args))
    reader = TerminalReader() if sys.stdin.isatty() and sys.stdout.isatty() else StreamReader(sys.stdin, sys.stdout)
    try:
        return run_chat_session(engine, sampling_params_from_args(args, engine.sampling_defaults), args.system,
                                args.verbose, reader, sys.stdout)
    finally:
        engine.shutdown()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvserve", description="Run and serve decoder-only language models.")
    parser.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=LazyCommandParser)

    gen = sub.add_parser("generate", help="complete a prompt, streaming the text to stdout")
    gen.add_argument("prompt")
    gen.add_argument("--chat", action="store_true", help="treat the prompt as a user message in the model's chat template")
    gen.add_argument("--verbose", action="store_true")
    add_engine_arguments(gen, chat=True)
    add_sampling_arguments(gen)
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="interactive chat on the model's chat template (/help inside lists its commands)")
    chat.add_argument("--system", default=None, help="system message")
    chat.add_argument("--verbose", action="store_true", help="show prompt, cached and generated token counts")
    add_engine_arguments(chat, chat=True)
    add_sampling_arguments(chat)
    chat.set_defaults(func=cmd_chat)

    _add_lazy_commands(sub)
    return parser


def _add_lazy_commands(sub: Any) -> None:
    """Subcommands that live in their own modules, imported only when the subcommand runs."""
    sub.add_parser("serve", help=SERVE.help, command=SERVE)
    bench = sub.add_parser("bench", help="benchmarks: measured, side by side")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True, parser_class=LazyCommandParser)
    for name, command in BENCH_COMMANDS.items():
        bench_sub.add_parser(name, help=command.help, command=command)
    sub.add_parser("estimate", help=ESTIMATE.help, command=ESTIMATE)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s")
    if args.log_level == "WARNING":  # the default: still say what a long start-up is doing (kvserve/startup.py)
        logging.getLogger("kvserve.startup").setLevel(logging.INFO)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as exc:
        print(f"kvserve: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
