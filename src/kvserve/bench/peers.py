"""The engines kvserve is compared with (`--compare transformers,llama.cpp`) and the options they take."""

from __future__ import annotations

import argparse

import torch

from kvserve.bench.kvserve_runner import KvserveRunner
from kvserve.bench.llama_cpp_runner import LlamaCppRunner, llama_cpp_skip_reason
from kvserve.bench.runner import Runner
from kvserve.bench.transformers_runner import TransformersRunner, load_transformers_model

PEERS = ("transformers", "llama.cpp")


class PeerUnavailable(Exception):
    """A peer that cannot run here; the message says why (the benchmark prints it and goes on)."""


def add_peer_arguments(parser: argparse.ArgumentParser, hf_batch_size: bool) -> None:
    g = parser.add_argument_group("comparison")
    g.add_argument("--compare", type=parse_compare, default=[], metavar="ENGINES",
                   help=f"comma-separated peers to run on the same prompts and weights: {', '.join(PEERS)}")
    if hf_batch_size:
        g.add_argument("--hf-batch-size", type=int, default=16,
                       help="transformers: prompts per static generate() batch (left padded)")
    g.add_argument("--hf-model", default=None, metavar="DIR",
                   help="transformers: load this Hugging Face directory instead of kvserve's weights "
                        "(by default a .gguf model is dequantized the same way kvserve loads it)")
    g.add_argument("--gguf", default=None, metavar="FILE",
                   help="llama.cpp: the GGUF to run (default: kvserve's model when it is a .gguf)")


def parse_compare(value: str) -> list[str]:
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in PEERS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown engine {unknown[0]!r}; allowed values are {', '.join(PEERS)}")
    return list(dict.fromkeys(names))


def load_peer(name: str, kvserve: KvserveRunner, args: argparse.Namespace, context_len: int) -> Runner:
    """Load peer ``name`` with kvserve's weights and dtype; raises PeerUnavailable with the reason it cannot run."""
    engine = kvserve.engine
    if name == "transformers":
        model, source = load_transformers_model(engine, args.hf_model)
        return TransformersRunner(model, getattr(args, "hf_batch_size", 1), source)
    if name == "llama.cpp":
        reason = llama_cpp_skip_reason(args.gguf, engine.model_path)
        if reason is not None:
            raise PeerUnavailable(reason)
        return LlamaCppRunner.load(args.gguf or engine.model_path, context_len, torch.get_num_threads())
    raise PeerUnavailable(f"unknown engine {name!r}; allowed values are {', '.join(PEERS)}")
