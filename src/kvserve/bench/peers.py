"""The engines kvserve is compared with (`--compare transformers,llama.cpp,llama-server`) and their options."""

from __future__ import annotations

import argparse

import torch

from kvserve.bench.kvserve_runner import KvserveRunner
from kvserve.bench.llama_cpp_runner import LlamaCppRunner, gguf_skip_reason, llama_cpp_skip_reason, peer_gguf
from kvserve.bench.llama_server_runner import DEFAULT_SLOTS, LlamaServerRunner, llama_server_skip_reason
from kvserve.bench.runner import Runner
from kvserve.bench.transformers_runner import TransformersRunner, load_transformers_model

PEERS = ("transformers", "llama.cpp", "llama-server")


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
                   help="llama.cpp, llama-server: the GGUF to run (default: kvserve's model when it is a .gguf, "
                        "dequantized to kvserve's dtype when its tensors are stored in another type)")
    g.add_argument("--llama-server", default=None, metavar="PATH",
                   help="llama-server: the llama-server binary to start (see docs/PERFORMANCE.md to build one)")
    g.add_argument("--llama-server-slots", type=_positive_int, default=DEFAULT_SLOTS, metavar="N",
                   help=f"llama-server: parallel slots, -np (default {DEFAULT_SLOTS})")


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


def parse_compare(value: str) -> list[str]:
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in PEERS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown engine {unknown[0]!r}; allowed values are {', '.join(PEERS)}")
    return list(dict.fromkeys(names))


def load_peer(name: str, kvserve: KvserveRunner, args: argparse.Namespace, context_len: int) -> Runner:
    """Load peer ``name`` with kvserve's weights and dtype; raises PeerUnavailable with the reason it cannot run.

    A peer that holds a resource (llama-server's process) is released by `close_peer`.
    """
    engine = kvserve.engine
    if name == "transformers":
        model, source = load_transformers_model(engine, args.hf_model)
        return TransformersRunner(model, getattr(args, "hf_batch_size", 1), source)
    if name == "llama.cpp":
        reason = llama_cpp_skip_reason(args.gguf, engine.model_path)
        if reason is not None:
            raise PeerUnavailable(reason)
        gguf = peer_gguf(args.gguf, engine.model_path, engine.config.torch_dtype)
        return LlamaCppRunner.load(gguf.path, context_len, torch.get_num_threads(), gguf.source)
    if name == "llama-server":
        reason = llama_server_skip_reason(args.llama_server) or gguf_skip_reason(args.gguf, engine.model_path)
        if reason is not None:
            raise PeerUnavailable(reason)
        gguf = peer_gguf(args.gguf, engine.model_path, engine.config.torch_dtype)
        return LlamaServerRunner.start(args.llama_server, gguf.path, args.llama_server_slots, context_len,
                                       torch.get_num_threads(), gguf.source)
    raise PeerUnavailable(f"unknown engine {name!r}; allowed values are {', '.join(PEERS)}")


def close_peer(peer: Runner) -> None:
    """Release what a peer holds (llama-server's process); peers without a ``close`` need nothing."""
    close = getattr(peer, "close", None)
    if close is not None:
        close()
