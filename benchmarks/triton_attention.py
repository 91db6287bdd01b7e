"""The Triton attention kernels on a CUDA GPU: correct against float64, timed against the hardware floor
and against PyTorch's own fused attention on contiguous K/V; and the whole engine on CUDA, greedy tokens
equal to transformers.

    PYTHONPATH=src python benchmarks/triton_attention.py --output triton_report.json
    PYTHONPATH=src python benchmarks/triton_attention.py --sweep     # tile sizes, warps, stages, partition size

Runs only where CUDA and triton are available (the lent H200 of docs/PERFORMANCE.md). Shapes are
Llama-3-8B's attention (32 query heads, 8 kv heads, head_dim 128), bf16, KV blocks of 16 tokens
scattered at random through a cache of several GB, so every timed launch reads well past the L2.

The floors: a decode reads every cached key and value once (bytes / measured copy bandwidth, the copy
counted as bytes read plus written); a prefill chunk does 4 * heads * head_dim FLOPs per (query, visible
key) pair (two matmuls of 2 FLOPs per multiply-add) at the measured bf16 matmul rate.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from typing import Any

import torch
import torch.nn.functional as F

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 32, 8, 128, 16


def ceilings() -> dict[str, float]:
    """Device-to-device copy bandwidth (read + write) and the bf16 matmul rate, measured here."""
    from triton.testing import do_bench

    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    copy_ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=200, return_mode="median")
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm_ms = do_bench(lambda: a @ b, warmup=50, rep=300, return_mode="median")
    return {"copy_bytes_per_s": 2 * src.numel() / (copy_ms / 1e3), "bf16_flops_per_s": 2 * 8192**3 / (mm_ms / 1e3)}


def paged_batch(query_lens: list[int], seq_lens: list[int], dtype: torch.dtype, heads: tuple[int, int, int] = (HEADS, KV_HEADS, HEAD_DIM),
                spare_blocks: int = 0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Any]:
    """q and a cache on the GPU whose blocks are scattered at random (with `spare_blocks` unused ones mixed in)."""
    from kvserve.attention.random_batch import random_paged_batch

    return random_paged_batch(query_lens, seq_lens, *heads, BLOCK, dtype, seed=seed, spare_blocks=spare_blocks + 1, device="cuda")


def check_correctness() -> list[dict[str, Any]]:
    """‖triton − ref‖ / ‖ref‖ with the reference computed in float64 from the same (rounded) inputs."""
    from kvserve.attention.reference import paged_attention_reference
    from kvserve.attention.triton_attention import paged_attention_triton

    cases = {
        "decodes across partitions": ([1, 1, 1, 1], [5, 300, 530, 4100]),
        "mixed decodes and prefill chunks": ([1, 1, 7, 40, 300], [3, 20, 7, 100, 1324]),
        "long chunk over a cached prefix": ([1, 2048], [9000, 6144]),
    }
    rows = []
    for dtype, tolerance in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)):
        for heads in ((HEADS, KV_HEADS, HEAD_DIM), (8, 1, 80), (4, 4, 64)):
            for name, (query_lens, seq_lens) in cases.items():
                q, k, v, meta = paged_batch(query_lens, seq_lens, dtype, heads, seed=len(rows))
                scale = heads[2] ** -0.5
                out = paged_attention_triton(q, k, v, meta, scale)
                ref = paged_attention_reference(q.double(), k.double(), v.double(), meta, scale)
                error = float((out.double() - ref).norm() / ref.norm())
                rows.append({"dtype": str(dtype).removeprefix("torch."), "heads": "/".join(map(str, heads)), "case": name,
                             "relative_error": error, "ok": bool(error < tolerance) and bool(torch.isfinite(out).all())})
    return rows


def time_kernels(ceiling: dict[str, float]) -> list[dict[str, Any]]:
    from torch.nn.attention.bias import causal_lower_right
    from triton.testing import do_bench

    from kvserve.attention.reference import paged_attention_reference
    from kvserve.attention.triton_attention import paged_attention_triton

    scale = HEAD_DIM**-0.5
    element = 2  # bf16
    decodes = {"decode 1 x 4,096": (1, 4096), "decode 64 x 4,096": (64, 4096), "decode 256 x 1,024": (256, 1024),
               "decode 8 x 32,768": (8, 32768)}
    rows = []
    for name, (batch, context) in decodes.items():
        q, k, v, meta = paged_batch([1] * batch, [context] * batch, torch.bfloat16, spare_blocks=max(0, 40_000 - batch * context // BLOCK))
        kv_bytes = 2 * batch * context * KV_HEADS * HEAD_DIM * element
        floor_ms = (kv_bytes + 2 * q.numel() * element) / ceiling["copy_bytes_per_s"] * 1e3
        triton_ms = do_bench(lambda: paged_attention_triton(q, k, v, meta, scale), warmup=25, rep=200, return_mode="median")
        ref_ms = do_bench(lambda: paged_attention_reference(q, k, v, meta, scale), warmup=10, rep=100, return_mode="median")
        # PyTorch's fused attention on the same keys laid out contiguously (no paging): the peer
        kd = torch.randn(batch, KV_HEADS, context, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        vd = torch.randn_like(kd)
        qd = q.view(batch, HEADS, 1, HEAD_DIM)
        sdpa_ms = do_bench(lambda: F.scaled_dot_product_attention(qd, kd, vd, scale=scale, enable_gqa=True),
                           warmup=25, rep=200, return_mode="median")
        rows.append({"case": name, "triton_ms": triton_ms, "reference_ms": ref_ms, "torch_sdpa_dense_ms": sdpa_ms,
                     "floor_ms": floor_ms, "triton_over_floor": triton_ms / floor_ms,
                     "achieved_bytes_per_s": (kv_bytes + 2 * q.numel() * element) / (triton_ms / 1e3)})
    prefills = {"prefill 4 x 2,048 from scratch": (4, 2048, 0), "prefill 1 x 2,048 over a 6,144 prefix": (1, 2048, 6144)}
    for name, (batch, chunk, prefix) in prefills.items():
        q, k, v, meta = paged_batch([chunk] * batch, [chunk + prefix] * batch, torch.bfloat16, spare_blocks=20_000)
        pairs = batch * sum(prefix + i + 1 for i in range(chunk))
        flops = 4 * HEADS * HEAD_DIM * pairs
        floor_ms = flops / ceiling["bf16_flops_per_s"] * 1e3
        triton_ms = do_bench(lambda: paged_attention_triton(q, k, v, meta, scale), warmup=10, rep=100, return_mode="median")
        ref_ms = do_bench(lambda: paged_attention_reference(q, k, v, meta, scale), warmup=5, rep=50, return_mode="median")
        qd = q.view(batch, chunk, HEADS, HEAD_DIM).transpose(1, 2)
        kd = torch.randn(batch, KV_HEADS, chunk + prefix, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        vd = torch.randn_like(kd)
        mask = causal_lower_right(chunk, chunk + prefix)
        sdpa_ms = do_bench(lambda: F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask, scale=scale, enable_gqa=True),
                           warmup=10, rep=100, return_mode="median")
        rows.append({"case": name, "triton_ms": triton_ms, "reference_ms": ref_ms, "torch_sdpa_dense_ms": sdpa_ms,
                     "floor_ms": floor_ms, "triton_over_floor": triton_ms / floor_ms, "achieved_flops_per_s": flops / (triton_ms / 1e3)})
    return rows


def engine_equality() -> list[dict[str, Any]]:
    """A tiny random Llama (GQA 4:2) on CUDA through the whole engine (Triton backend, chunked prefill,
    prefix caching, n>1): greedy tokens equal transformers' `generate` on the same weights, in float32."""
    import transformers

    from kvserve import LLM, SamplingParams
    from kvserve.estimate.dummy_model import tiny_tokenizer

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                                      bos_token_id=0, eos_token_id=1)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08 if "embed" in name else 0.05)
    directory = tempfile.mkdtemp(prefix="kvserve-tiny-")
    model.save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    rng = random.Random(1)
    prompts = [[rng.randrange(2, 512) for _ in range(n)] for n in (5, 37, 130, 300, 64, 64)]
    prompts[5][:48] = prompts[4][:48]  # a shared prefix for the prefix cache
    rows = []
    hf = model.cuda().eval()
    expected = []
    for prompt in prompts:
        out = hf.generate(torch.tensor([prompt], device="cuda"), attention_mask=torch.ones(1, len(prompt), dtype=torch.long, device="cuda"),
                          max_new_tokens=24, min_new_tokens=24, do_sample=False, pad_token_id=0, eos_token_id=None)
        expected.append(out[0, len(prompt):].tolist())
    for settings in ({"max_num_batched_tokens": 64}, {"max_num_batched_tokens": 2048, "block_size": 1}):
        llm = LLM(directory, dtype="float32", kv_cache_memory_bytes=256 << 20, **settings)
        outs = llm.generate(prompt_token_ids=prompts, sampling_params=SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
                            use_tqdm=False)
        got = [o.outputs[0].token_ids for o in outs]
        plan = llm.llm_engine.worker_info.kernel_plan
        rows.append({"settings": json.dumps(settings), "attention": plan.attention_backend if plan else "?",
                     "equal_requests": sum(g == e for g, e in zip(got, expected)), "requests": len(prompts)})
        n4 = llm.generate(prompt_token_ids=prompts[:2], sampling_params=SamplingParams(n=4, temperature=1.0, seed=3, max_tokens=8),
                          use_tqdm=False)
        rows[-1]["n4_outputs"] = sum(len(o.outputs) for o in n4)
        del llm
    return rows


def sweep() -> list[dict[str, Any]]:
    """Time the kernels over tile sizes, warps, pipeline stages (and the decode partition size) on three
    decode and one prefill shape; every variant's output is checked against the shipped configuration's."""
    import itertools

    from triton.testing import do_bench

    from kvserve.attention import triton_attention as ta

    scale = HEAD_DIM**-0.5
    rows: list[dict[str, Any]] = []
    shipped_decode, shipped_prefill = ta.decode_config, ta.prefill_config
    decode_shapes = {"64 x 4,096": (64, 4096), "1 x 4,096": (1, 4096), "256 x 1,024": (256, 1024)}
    decode_batches = {name: paged_batch([1] * b, [c] * b, torch.bfloat16, spare_blocks=20_000) for name, (b, c) in decode_shapes.items()}
    expected = {name: ta.paged_attention_triton(q, k, v, meta, scale) for name, (q, k, v, meta) in decode_batches.items()}
    for block_n, warps, stages, partition in itertools.product((32, 64, 128), (4, 8), (1, 2, 3, 4), (256, 512)):
        if block_n > partition:
            continue

        def config(*args: Any, _n: int = block_n, _w: int = warps, _s: int = stages) -> dict[str, Any]:
            return {**shipped_decode(*args), "BLOCK_N": _n, "num_warps": _w, "num_stages": _s}

        ta.decode_config = config
        row: dict[str, Any] = {"kernel": "decode", "BLOCK_N": block_n, "num_warps": warps, "num_stages": stages, "PARTITION": partition}
        try:
            for name, (q, k, v, meta) in decode_batches.items():
                out = ta.paged_attention_triton(q, k, v, meta, scale, partition_size=partition)
                row["ok"] = row.get("ok", True) and bool(torch.allclose(out.float(), expected[name].float(), atol=2e-2, rtol=2e-2))
                row[name] = do_bench(lambda: ta.paged_attention_triton(q, k, v, meta, scale, partition_size=partition),
                                     warmup=10, rep=60, return_mode="median")
        except Exception as exc:  # a variant that does not compile (shared memory, registers)
            row["error"] = repr(exc)[:120]
        rows.append(row)
    ta.decode_config = shipped_decode
    q, k, v, meta = paged_batch([2048] * 4, [2048] * 4, torch.bfloat16, spare_blocks=20_000)
    reference = ta.paged_attention_triton(q, k, v, meta, scale)
    for block_m, block_n, warps, stages in itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3)):
        def config(*args: Any, _m: int = block_m, _n: int = block_n, _w: int = warps, _s: int = stages) -> dict[str, Any]:
            return {**shipped_prefill(*args), "BLOCK_M": _m, "BLOCK_N": _n, "num_warps": _w, "num_stages": _s}

        ta.prefill_config = config
        row = {"kernel": "prefill", "BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": warps, "num_stages": stages}
        try:
            out = ta.paged_attention_triton(q, k, v, meta, scale)
            row["ok"] = bool(torch.allclose(out.float(), reference.float(), atol=2e-2, rtol=2e-2))
            row["4 x 2,048"] = do_bench(lambda: ta.paged_attention_triton(q, k, v, meta, scale), warmup=10, rep=60, return_mode="median")
        except Exception as exc:
            row["error"] = repr(exc)[:120]
        rows.append(row)
    ta.prefill_config = shipped_prefill
    return rows


def print_sweep(rows: list[dict[str, Any]]) -> None:
    for kernel, shapes in (("decode", ("64 x 4,096", "1 x 4,096", "256 x 1,024")), ("prefill", ("4 x 2,048",))):
        timed = [r for r in rows if r["kernel"] == kernel and "error" not in r and r.get("ok")]
        timed.sort(key=lambda r: r[shapes[0]])
        print(f"\n{kernel}: {len(timed)} variants ran and matched, {sum(r['kernel'] == kernel for r in rows) - len(timed)} failed; fastest first")
        for r in timed[:8]:
            knobs = {k: v for k, v in r.items() if k not in (*shapes, "kernel", "ok")}
            print(knobs, {shape: round(r[shape], 4) for shape in shapes})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=None)
    parser.add_argument("--sweep", action="store_true", help="time the kernels' tile, warp, stage and partition choices instead")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    if args.sweep:
        rows = sweep()
        if args.output:
            with open(args.output, "w") as f:
                json.dump(rows, f, indent=1)
        print_sweep(rows)
        return 0
    report: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    import triton

    report["triton"] = triton.__version__
    report["ceilings"] = ceilings()
    print(json.dumps(report["ceilings"]), flush=True)
    report["correctness"] = check_correctness()
    print(f"correctness: {sum(r['ok'] for r in report['correctness'])}/{len(report['correctness'])} ok", flush=True)
    report["timings"] = time_kernels(report["ceilings"])
    report["engine"] = engine_equality()
    if args.output:
        with open(args.output, "w") as f:
            json.dump(report, f, indent=1)
    c = report["ceilings"]
    print(f"\n{report['device']}, torch {report['torch']}, triton {report['triton']}: copy {c['copy_bytes_per_s'] / 1e12:.2f} TB/s, "
          f"bf16 matmul {c['bf16_flops_per_s'] / 1e12:.0f} TFLOP/s")
    bad = [r for r in report["correctness"] if not r["ok"]]
    worst = max(report["correctness"], key=lambda r: r["relative_error"] if r["dtype"] == "bfloat16" else 0)
    print(f"correctness: {len(report['correctness']) - len(bad)}/{len(report['correctness'])} within tolerance; "
          f"worst bf16 {worst['relative_error']:.2e}; failures: {bad}")
    print("| case | triton | reference (gather + SDPA) | torch SDPA, dense K/V | floor | triton / floor |")
    print("|---|---|---|---|---|---|")
    for r in report["timings"]:
        print(f"| {r['case']} | {r['triton_ms']:.3f} ms | {r['reference_ms']:.3f} ms | {r['torch_sdpa_dense_ms']:.3f} ms | "
              f"{r['floor_ms']:.3f} ms | {r['triton_over_floor']:.2f}x |")
    for r in report["engine"]:
        print(f"engine on CUDA {r['settings']} ({r['attention']}): {r['equal_requests']}/{r['requests']} greedy requests "
              f"equal transformers; n=4 gave {r['n4_outputs']} outputs")
    return 0 if not bad and all(r["equal_requests"] == r["requests"] for r in report["engine"]) else 1


if __name__ == "__main__":
    sys.exit(main())
