"""The engine's command-line options, shared by every command that loads a model.

`kvserve generate`, `kvserve chat`, `kvserve serve` and the `kvserve bench`
commands add the same `--model`, `--dtype`, `--max-num-seqs`, ... options and
turn them into one `EngineConfig` (vLLM's `EngineArgs` role). They live here, not
in the CLI, so that the server and the benchmarks can use them without
importing the `kvserve` command that registers them.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TYPE_CHECKING

from kvserve.validation import parse_bytes, parse_tokens

if TYPE_CHECKING:  # the config imports torch: parsing the command line does not need it
    from kvserve.config import EngineConfig


def add_engine_arguments(parser: argparse.ArgumentParser, seed_alias: bool = False, chat: bool = False) -> None:
    """Engine options shared by every subcommand that loads a model, named as vLLM names them, with
    llama-server's short forms (-m, -c, -np, -t). `seed_alias`: `--seed` also sets the engine seed, as in
    `vllm serve` (not where `--seed` is already the sampling seed, as in `kvserve generate`). `chat`: the
    command renders chat templates, and takes `--chat-template`."""
    g = parser.add_argument_group("engine")
    g.add_argument("--model", "-m", default=None,
                   help="HF directory, hub id or .gguf file (default: the built-in SmolLM2-135M-Instruct)")
    g.add_argument("--tokenizer", default=None)
    g.add_argument("--skip-tokenizer-init", action="store_true",
                   help="load no tokenizer (a model directory without tokenizer files): prompts must be token ids")
    if chat:
        g.add_argument("--chat-template", default=None, metavar="FILE|TEMPLATE",
                       help="a Jinja chat template, or a file holding one, in place of the tokenizer's")
    g.add_argument("--generation-config", default="auto", metavar="auto|vllm|FOLDER",
                   help="auto: default temperature, top_p, top_k, min_p, repetition_penalty and max tokens from the "
                        "model's generation_config.json (as vLLM); vllm: ignore it; FOLDER: read that folder's")
    g.add_argument("--trust-remote-code", action="store_true",
                   help="accepted for vLLM's sake: kvserve never runs a model's own code, and refuses a model that needs it")
    g.add_argument("--enforce-eager", action="store_true",
                   help="accepted for vLLM's sake: kvserve always runs eagerly (no CUDA graphs, no torch.compile)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    g.add_argument("--load-format", default="auto", choices=["auto", "safetensors", "pt", "gguf", "dummy"])
    g.add_argument("--max-model-len", "-c", type=_tokens("--max-model-len"), default=None,
                   help="longest prompt + output in tokens; k/m suffixes count 1000s, K/M 1024s (e.g. 8k, 4K); "
                        "default: the model's context length")
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument(
        "--kv-cache-dtype", default="auto", choices=["auto", "int8", "fp8_e4m3"],
        help="auto: K and V in --dtype; int8 / fp8_e4m3: 1 byte per value plus an fp32 scale per token and kv head "
        "(~1.9x the tokens of bf16 in the same memory; read in place by the CPU kernel, by the reference "
        "backend on CUDA)",
    )
    g.add_argument("--sliding-window", type=int, default=None,
                   help="every layer attends only to its last W keys (StreamingLLM's window); blocks behind it are "
                        "freed, and a request may generate past --max-model-len (docs/STREAMING.md)")
    g.add_argument("--attention-sinks", type=int, default=0,
                   help="with --sliding-window: the first S tokens stay in every layer's cache (StreamingLLM's "
                        "attention sinks), at positions within the cache (default 0)")
    g.add_argument("--kv-cache-memory-bytes", type=_bytes("--kv-cache-memory-bytes"), default=None,
                   help="bytes of KV cache per rank, with an optional unit (64MiB, 4GB); overrides --gpu-memory-utilization")
    g.add_argument("--gpu-memory-utilization", type=float, default=None,
                   help="on CUDA the fraction of the device's memory for weights + KV cache (as in vLLM); on CPU the "
                        "fraction of the available RAM for the KV cache (default: 30%%, at most 4 GiB)")
    g.add_argument("--max-num-seqs", "-np", type=int, default=256)
    g.add_argument("--max-num-batched-tokens", type=_tokens("--max-num-batched-tokens"), default=2048)
    g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction, default=True)
    seed_flags = ("--engine-seed", "--seed") if seed_alias else ("--engine-seed",)
    g.add_argument(*seed_flags, dest="engine_seed", type=int, default=0, help="seed of the engine's own random generator")
    g.add_argument(
        "--attention-backend",
        default="auto",
        choices=["auto", "reference", "cpu", "triton"],
        help="auto: the C++ kernel on CPU, the Triton kernels on CUDA (when triton is installed), else reference; "
        "reference: gather + SDPA (slow, the test oracle); cpu: the C++ kernel; triton: the Triton kernels (CUDA only)",
    )
    g.add_argument(
        "--linear-backend", default="auto", choices=["auto", "torch", "cpu"],
        help="matmuls with few rows (decode): the C++ CPU kernel (auto, where it builds) or always torch",
    )
    g.add_argument("--quantization", "-q", default="auto", choices=["auto", "none", "int8", "int4"],
                   help="auto: a GGUF's weights stay in their blocks where the CPU kernels read them (Q8_0, Q4_0, Q4_1, ...); "
                        "none: dequantize every tensor to --dtype at load; int8 (per output channel) / int4 (groups, "
                        "scale and zero): quantize the decoder's linear layers of any checkpoint at load (CPU)")
    g.add_argument("--quantization-group-size", type=int, default=32, choices=[32, 64, 128],
                   help="weights per int4 group sharing a scale and zero (default 32)")
    g.add_argument("--threads", "-t", dest="num_threads", type=int, default=None,
                   help="CPU threads (default: the cores this process may run on)")
    g.add_argument("--no-adaptive-threads", dest="adaptive_threads", action="store_false",
                   help="always use --threads threads (default: fewer when steps measure faster with fewer, "
                        "as when another process keeps a core busy)")
    g.add_argument("--speculative-config", default=None,
                   help='speculative decoding, as vLLM\'s JSON: \'{"method": "ngram", "num_speculative_tokens": 5, '
                        '"prompt_lookup_max": 4}\' (prompt lookup: proposals copied from the request\'s own text, '
                        'verified in one step; greedy and seeded outputs are unchanged), or \'{"model": DRAFT, '
                        '"num_speculative_tokens": 3}\' (a smaller model with the same tokenizer proposes; optional '
                        '"quantization" for its weights)')
    p = parser.add_argument_group("parallel")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                   help="ranks that split every layer (attention heads, MLP columns, vocabulary); on CPU each rank gets "
                        "an equal share of --threads and of the cores, pinned")
    p.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1, help="ranks holding consecutive layers")
    p.add_argument("--data-parallel-size", "-dp", type=int, default=1,
                   help="whole-model replicas (each on its own ranks and cores), requests routed to the replica that "
                        "holds their prefix, else the least loaded")
    p.add_argument("--pp-layer-partition", type=_layer_counts, default=None,
                   help="layers per pipeline stage, comma-separated (e.g. 12,18); default: as even as possible")
    p.add_argument("--no-pipeline-micro-batching", dest="pipeline_micro_batching", action="store_false",
                   help="one batch in flight for the whole pipeline (default: one per stage, each stage's own "
                        "scheduler over 1/pp of the KV blocks, so that stages compute at the same time)")
    p.add_argument("--distributed-executor-backend", default=None, choices=["uni", "mp", "external_launcher"],
                   help="mp: spawn one process per rank (default for more than one rank); external_launcher: every "
                        "rank is a process torchrun started, each running this same command")


def _bytes(flag: str) -> Callable[[str], int]:
    """An argparse type for a byte size with an optional unit, its error naming `flag`."""
    def parse(text: str) -> int:
        try:
            return int(parse_bytes(text, flag))
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return parse


def _tokens(flag: str) -> Callable[[str], int]:
    """An argparse type for a token count with vLLM's k/K suffixes, its error naming `flag`."""
    def parse(text: str) -> int:
        try:
            return parse_tokens(text, flag)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return parse


def _layer_counts(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer counts like 12,18, got {text!r}") from None


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    """The `EngineConfig` that the options of `add_engine_arguments` spell."""
    from kvserve.config import EngineConfig

    return EngineConfig(
        model=args.model,
        tokenizer=args.tokenizer,
        dtype=args.dtype,
        load_format=args.load_format,
        max_model_len=args.max_model_len,
        block_size=args.block_size,
        kv_cache_dtype=args.kv_cache_dtype,
        kv_cache_memory_bytes=args.kv_cache_memory_bytes,
        gpu_memory_utilization=args.gpu_memory_utilization,
        trust_remote_code=args.trust_remote_code,
        enforce_eager=args.enforce_eager,
        skip_tokenizer_init=args.skip_tokenizer_init,
        chat_template=getattr(args, "chat_template", None),
        generation_config=args.generation_config,
        sliding_window=args.sliding_window,
        attention_sinks=args.attention_sinks,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        enable_prefix_caching=args.enable_prefix_caching,
        enable_chunked_prefill=args.enable_chunked_prefill,
        seed=args.engine_seed,
        attention_backend=args.attention_backend,
        linear_backend=args.linear_backend,
        quantization=args.quantization,
        quantization_group_size=args.quantization_group_size,
        num_threads=args.num_threads,
        adaptive_threads=args.adaptive_threads,
        tensor_parallel_size=args.tensor_parallel_size,
        pipeline_parallel_size=args.pipeline_parallel_size,
        data_parallel_size=args.data_parallel_size,
        pp_layer_partition=args.pp_layer_partition,
        pipeline_micro_batching=args.pipeline_micro_batching,
        distributed_executor_backend=args.distributed_executor_backend,
        speculative_config=args.speculative_config,
    )
