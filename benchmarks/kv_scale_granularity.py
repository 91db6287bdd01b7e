"""How much a KV scale per token and kv head buys over one per block and kv head, on a real model's K/V.

The default model (or --model) prefills the first `--tokens` tokens of benchmarks/data/kjv_genesis.txt
with a cache in its own dtype; every layer's K and V rows are captured as they are stored. Each is then
quantized to int8 and fp8 e4m3 two ways, symmetric in both: a scale per (token, kv head) over its
head_dim values, as kvserve's --kv-cache-dtype stores them, and a scale per (block of `--block-size`
tokens, kv head) over block_size x head_dim values. Printed: the relative error ||x - dequantized|| /
||x|| over all layers, and the worst layer.

    .venv/bin/python benchmarks/kv_scale_granularity.py --tokens 1024
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from kvserve import LLM, SamplingParams
from kvserve.attention import kv_quant
from kvserve.layers.attention import Attention

TEXT = Path(__file__).parent / "data" / "kjv_genesis.txt"


def captured_kv(llm: LLM, token_ids: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(K, V) [tokens, kv heads, head_dim] of every layer for one prefill of `token_ids`."""
    captured: list[tuple[torch.Tensor, torch.Tensor]] = []
    layers = [m for m in llm.llm_engine.executor.worker.model.modules() if isinstance(m, Attention)]
    for layer in layers:
        store = layer.backend.store_kv

        def recording(k, v, *args, _store=store):  # type: ignore[no-untyped-def]
            captured.append((k.float().clone(), v.float().clone()))
            return _store(k, v, *args)

        layer.backend = type("Recording", (), {"name": layer.backend.name, "store_kv": staticmethod(recording),
                                               "attend": staticmethod(layer.backend.attend)})()
    llm.generate(prompt_token_ids=[token_ids], sampling_params=SamplingParams(max_tokens=1), use_tqdm=False)
    return captured


def per_block(x: torch.Tensor, kv_format: str, block_size: int) -> torch.Tensor:
    """x [T, H, D] quantized with one scale per (block of tokens, head), dequantized."""
    tokens, heads, dim = x.shape
    blocks = x.new_zeros(-(-tokens // block_size) * block_size, heads, dim)
    blocks[:tokens] = x
    grouped = blocks.view(-1, block_size, heads, dim).transpose(1, 2).reshape(-1, heads, block_size * dim)
    values, scales = kv_quant.quantize(grouped, kv_format)
    out = kv_quant.dequantize(values, scales, torch.float32)
    return out.view(-1, heads, block_size, dim).transpose(1, 2).reshape(-1, heads, dim)[:tokens]


def per_token(x: torch.Tensor, kv_format: str) -> torch.Tensor:
    values, scales = kv_quant.quantize(x, kv_format)
    return kv_quant.dequantize(values, scales, torch.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--block-size", type=int, default=16)
    args = parser.parse_args()
    llm = LLM(args.model, max_num_batched_tokens=max(2048, args.tokens))
    ids = llm.get_tokenizer()(TEXT.read_text(), add_special_tokens=False).input_ids[: args.tokens]
    layers = captured_kv(llm, ids)
    results = {}
    for kv_format in ("int8", "fp8_e4m3"):
        for granularity in ("token", "block"):
            for name, index in (("K", 0), ("V", 1)):
                errors, total_err, total = [], 0.0, 0.0
                for kv in layers:
                    x = kv[index]
                    xq = per_token(x, kv_format) if granularity == "token" else per_block(x, kv_format, args.block_size)
                    err, norm = (x - xq).norm().item(), x.norm().item()
                    errors.append(err / norm)
                    total_err, total = total_err + err**2, total + norm**2
                results[f"{kv_format} per {granularity} {name}"] = {"relative_error": (total_err / total) ** 0.5,
                                                                    "worst_layer": max(errors)}
    print(json.dumps({"model": llm.llm_engine.model_path, "tokens": len(ids), "layers": len(layers),
                      "block_size": args.block_size, "results": results}, indent=1))
    print("| format | K per token | K per block | V per token | V per block |")
    print("|---|---|---|---|---|")
    for kv_format in ("int8", "fp8_e4m3"):
        cells = [f"{results[f'{kv_format} per {g} {n}']['relative_error']:.2%} "
                 f"(worst layer {results[f'{kv_format} per {g} {n}']['worst_layer']:.2%})"
                 for n in ("K", "V") for g in ("token", "block")]
        print(f"| {kv_format} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
