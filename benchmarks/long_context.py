"""Issue 7's W4: attention at long context, against its KV-read floor, and prefill memory.

Two measurements on the default model (or --model):

1. decode: `--batch` sequences of `--context` prompt tokens are prefilled, then
   decode steps are timed with every attention backend call timed separately.
   Attention must read each sequence's whole K and V once per layer and step, so
   its floor is (KV bytes of the batch) / (read bandwidth of the shared hardware
   helper, `kvserve.estimate.hardware.measure_local_hardware`).
2. prefill memory: one `--prefill-len`-token prompt runs in a fresh process; its
   peak RSS is reset after loading (Linux /proc/self/clear_refs) and the growth of
   the peak during the prefill is compared with the KV cache it fills and with the
   score matrix a non-tiled attention would build for one chunk
   (heads x chunk x context x 4 bytes).

    .venv/bin/python benchmarks/long_context.py --dtype float32 --batch 4 --context 4096 --prefill-len 8000
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from types import SimpleNamespace

import torch

from kvserve.config import EngineConfig
from kvserve.engine.llm_engine import LLMEngine
from kvserve.engine.model_runner import kv_bytes_per_token
from kvserve.layers.attention import Attention
from kvserve.sampling_params import SamplingParams


def engine_for(args: argparse.Namespace, tokens: int, backend: str) -> LLMEngine:
    kv_bytes = (tokens + 1024) * 100_000  # more than any model here needs per token (SmolLM2 fp32: 46 KB)
    return LLMEngine(EngineConfig(model=args.model, dtype=args.dtype, attention_backend=backend,
                                  kv_cache_memory_bytes=kv_bytes, max_num_batched_tokens=args.chunk,
                                  max_model_len=max(args.context, args.prefill_len) + args.steps + 8))


def random_prompt(rng: random.Random, vocab: int, n: int) -> list[int]:
    return [rng.randrange(vocab) for _ in range(n)]


def decode_attention(args: argparse.Namespace) -> dict:
    from kvserve.estimate.hardware import measure_local_hardware

    bandwidth = measure_local_hardware().memory_bandwidth
    engine = engine_for(args, args.batch * (args.context + args.steps), args.backend)
    rng = random.Random(0)
    params = SamplingParams(temperature=0.0, max_tokens=args.steps + 2, ignore_eos=True)
    for i in range(args.batch):
        engine.add_request(f"long-{i}", random_prompt(rng, engine.hf_config.vocab_size, args.context), params)
    engine.step()
    while engine.last_step.num_prefill_tokens:
        engine.step()
    engine.step()  # warm

    spent = [0.0]
    for module in engine.executor.worker.model.modules():
        if getattr(module, "cpu_layer", None) is not None:
            module.cpu_layer = None  # the one-call C++ layer runs the same attention kernel, untimed
    layers = [m for m in engine.executor.worker.model.modules() if isinstance(m, Attention)]
    for layer in layers:
        inner = layer.backend

        def timed(*a, _inner=inner.attend, **kw):  # type: ignore[no-untyped-def]
            start = time.perf_counter()
            out = _inner(*a, **kw)
            spent[0] += time.perf_counter() - start
            return out

        layer.backend = SimpleNamespace(name=inner.name, store_kv=inner.store_kv, attend=timed)
    started = time.perf_counter()
    for _ in range(args.steps):
        engine.step()
    step = (time.perf_counter() - started) / args.steps
    attention = spent[0] / args.steps
    mean_context = args.context + 1 + args.steps / 2
    kv_bytes = args.batch * mean_context * kv_bytes_per_token(engine.hf_config, engine.config.torch_dtype)
    floor = kv_bytes / bandwidth
    return {
        "batch": args.batch, "context": args.context, "backend": args.backend, "dtype": args.dtype,
        "step_ms": 1e3 * step, "attention_ms": 1e3 * attention, "kv_read_mb": kv_bytes / 1e6,
        "bandwidth_gbs": bandwidth / 1e9, "floor_ms": 1e3 * floor, "attention_over_floor": attention / floor,
    }


def status_bytes(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS, VmHWM), in bytes."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def reset_peak_rss() -> int:
    """Reset this process's peak RSS to its current RSS (Linux clear_refs 5); returns that RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return status_bytes("VmRSS")


def prefill_memory_child(args: argparse.Namespace) -> dict:
    """Runs in a fresh process: peak RSS growth while one long prompt is prefilled."""
    engine = engine_for(args, args.prefill_len + 8, args.backend)
    rng = random.Random(1)
    prompt = random_prompt(rng, engine.hf_config.vocab_size, args.prefill_len)
    before = reset_peak_rss()
    started = time.perf_counter()
    engine.add_request("prefill", prompt, SamplingParams(temperature=0.0, max_tokens=1))
    while engine.has_unfinished_requests():
        engine.step()
    elapsed = time.perf_counter() - started
    after = status_bytes("VmHWM")
    config = engine.hf_config
    kv = args.prefill_len * kv_bytes_per_token(config, engine.config.torch_dtype)
    scores = config.num_attention_heads * args.chunk * args.prefill_len * 4
    return {
        "prefill_len": args.prefill_len, "chunk": args.chunk, "backend": args.backend, "dtype": args.dtype,
        "seconds": elapsed, "peak_rss_growth_mb": (after - before) / 1e6, "kv_cache_filled_mb": kv / 1e6,
        "one_chunk_score_matrix_mb": scores / 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--backend", default="cpu", choices=["cpu", "reference"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--prefill-len", type=int, default=8000)
    parser.add_argument("--chunk", type=int, default=2048, help="max_num_batched_tokens: the prefill chunk")
    parser.add_argument("--skip", choices=["decode", "prefill"], default=None)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(prefill_memory_child(args)))
        return
    print(f"{torch.get_num_threads()} threads")
    if args.skip != "decode":
        print(json.dumps(decode_attention(args)))
    if args.skip != "prefill":
        child = subprocess.run([sys.executable, __file__, "--child", *sys.argv[1:]], capture_output=True, text=True, check=True)
        print(child.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
