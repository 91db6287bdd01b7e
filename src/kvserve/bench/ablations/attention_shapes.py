"""MHA vs GQA vs MQA at the same hidden size: KV bytes per token and max concurrency.

Grouped-query attention keeps all query heads but shares each key/value head
among a group of them; multi-query attention keeps a single key/value head. The
KV cache shrinks by ``heads / kv_heads``, so the same memory holds that many
times more tokens and sequences. Each shape is built in the engine with the same
KV byte budget, and the engine's allocation is set beside the estimator's
prediction; a second table applies the estimator to a 7B model on an
A100-80GB, where the difference decides the batch size.
"""

from __future__ import annotations

from kvserve.bench.ablations.common import (
    AblationContext, AblationResult, markdown_table, new_figure,
)
from kvserve.estimate import HARDWARE, EstimateParams, ModelShape, estimate, get_preset

BLOCK_SIZE = 16


def kv_head_variants(num_heads: int, gqa_kv_heads: int | None = None) -> list[tuple[str, int]]:
    """``[("MHA", heads), ("GQA", g), ("MQA", 1)]`` with ``g`` a divisor of ``heads`` in between."""
    if gqa_kv_heads is None or not 1 < gqa_kv_heads < num_heads:
        divisors = [d for d in range(2, num_heads) if num_heads % d == 0]
        if not divisors:
            raise ValueError(f"shape: {num_heads} query heads have no divisor between 1 and "
                             "themselves, so there is no GQA variant")
        gqa_kv_heads = divisors[len(divisors) // 2]
    return [("MHA", num_heads), ("GQA", gqa_kv_heads), ("MQA", 1)]


def run(ctx: AblationContext) -> AblationResult:
    budget = ctx.size(128 * 2**20, 2**20)
    seq_len = ctx.size(1024, 128)
    base = ctx.shape
    # With the KV budget given, the KV numbers depend on no device property: any table
    # entry with fp32 serves, and this machine need not be measured.
    hardware = HARDWARE["a100-80gb"]
    params = EstimateParams(dtype="fp32", kv_cache_memory_bytes=budget, block_size=BLOCK_SIZE,
                            input_len=seq_len // 2, output_len=seq_len - seq_len // 2)
    rows, measured = [], []
    with ctx.bar(3, "MHA / GQA / MQA") as bar:
        for kind, kv_heads in kv_head_variants(base.num_heads, base.num_kv_heads):
            shape = base.with_kv_heads(kv_heads, name=f"{base.name}-{kind.lower()}")
            predicted = estimate(shape, hardware, params)
            engine = ctx.engine(shape, warm_up=False, kv_cache_memory_bytes=budget,
                                block_size=BLOCK_SIZE, max_model_len=seq_len)
            stats = engine.stats()
            tokens = stats.num_blocks * stats.block_size
            kv_bytes = engine.worker_info.kv_cache_bytes
            blocks_per_seq = -(-seq_len // BLOCK_SIZE)
            concurrency = stats.num_blocks // blocks_per_seq
            measured.append((kind, kv_bytes / tokens, concurrency, predicted.max_num_seqs))
            rows.append((f"{kind} ({base.num_heads} q / {kv_heads} kv heads)",
                         f"{shape.num_params:,}", f"{predicted.kv_bytes_per_token:,.0f}",
                         f"{kv_bytes / tokens:,.0f}", f"{predicted.kv_cache_tokens:,}",
                         f"{tokens:,}", f"{predicted.max_num_seqs:,}", f"{concurrency:,}"))
            del engine
            bar.update(1)
    table = markdown_table(
        ["attention", "parameters", "KV B/token (estimator)", "KV B/token (engine)",
         "tokens held (estimator)", "tokens held (engine)",
         f"max sequences of {seq_len} (estimator)", f"max sequences of {seq_len} (engine)"],
        rows)
    at_scale = _at_7b_scale()
    mha, gqa, mqa = measured
    findings = [
        f"At hidden size {base.hidden_size} and {base.num_heads} query heads, the same "
        f"{budget / 2**20:,.0f} MiB KV budget runs {mha[2]} (MHA), {gqa[2]} (GQA) and "
        f"{mqa[2]} (MQA) sequences of {seq_len} tokens in the engine, exactly as the estimator "
        "predicts." if all(m[2] == m[3] for m in measured) else
        "The engine's concurrency differs from the estimator's prediction: see the table.",
        f"KV bytes per token shrink by the query-to-KV head ratio: "
        f"{mha[1] / gqa[1]:,.0f}× (GQA) and {mha[1] / mqa[1]:,.0f}× (MQA) smaller than MHA.",
    ]
    figure, (left, right) = new_figure(2, f"MHA vs GQA vs MQA (hidden {base.hidden_size})")
    kinds = [m[0] for m in measured]
    left.bar(kinds, [m[1] for m in measured], color=["C0", "C1", "C2"])
    left.set(ylabel="KV bytes per token (engine)", title="KV cache per token")
    right.bar(kinds, [m[2] for m in measured], color=["C0", "C1", "C2"], label="engine")
    right.scatter(kinds, [m[3] for m in measured], color="k", marker="_", s=400, zorder=3,
                  label="estimator")
    right.set(ylabel=f"sequences of {seq_len} tokens",
              title=f"max concurrency in {budget / 2**20:,.0f} MiB")
    right.legend()
    return AblationResult(
        name="attention_shapes", title="MHA vs GQA vs MQA",
        claim="Sharing key/value heads among query heads (GQA, MQA) shrinks the KV cache per "
              "token by heads / kv_heads, so the same memory serves that many times more "
              "concurrent sequences.",
        setup=f"{base.name} ({base.num_layers} layers, hidden {base.hidden_size}, "
              f"{base.num_heads} query heads of {base.head_dim}) with MHA, GQA and MQA "
              f"key/value heads, fp32, the same kv_cache_memory_bytes = {budget:,} and block "
              f"size {BLOCK_SIZE}. Engine concurrency: its blocks // blocks per "
              f"{seq_len}-token sequence.",
        tables=[table, at_scale], findings=findings, figure=figure,
        metrics={f"{key}_{kind.lower()}": value
                 for kind, per_token, engine_seqs, estimator_seqs in measured
                 for key, value in (("kv_bytes_per_token", per_token),
                                    ("max_seqs_engine", engine_seqs),
                                    ("max_seqs_estimator", estimator_seqs))},
    )


def _at_7b_scale() -> str:
    """The estimator alone: llama2-7b's shape with 32, 8 and 1 KV heads on an A100-80GB."""
    base = get_preset("llama2-7b")
    hardware = HARDWARE["a100-80gb"]
    params = EstimateParams(dtype="fp16", input_len=2048, output_len=2048)
    rows = []
    for kind, kv_heads in kv_head_variants(base.num_heads, 8):
        shape: ModelShape = base.with_kv_heads(kv_heads)
        result = estimate(shape, hardware, params)
        rows.append((f"{kind} ({kv_heads} kv heads)", f"{result.num_params / 1e9:,.2f} B",
                     f"{result.kv_bytes_per_token / 2**10:,.0f} KiB",
                     f"{result.kv_cache_tokens:,}", f"{result.max_concurrent_sequences:,.1f}"))
    return ("Estimator only, llama2-7b's shape on one A100-80GB (fp16, 90% of memory, "
            "sequences of 2048 + 2048 tokens):\n\n" + markdown_table(
                ["attention", "parameters", "KV per token", "tokens held",
                 "max concurrent sequences"], rows))
