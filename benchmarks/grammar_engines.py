"""xgrammar against llguidance on the default model's vocabulary (SmolLM2-135M-Instruct, 49,152 tokens): how the
grammar engine for structured output was chosen (docs/STRUCTURED_OUTPUT.md).

    python benchmarks/grammar_engines.py [--repeat 3]      # llguidance is not a kvserve dependency:
                                                           # pip install llguidance to compare (else xgrammar only)

For each engine: building its tokenizer view (once per model), compiling a typical JSON schema (a person with
an enum, a nested object with a pattern, an array), and, walking a valid instance's tokens one at a time, the
time to fill the next-token bitmask (the per-token, per-request cost of constrained decoding) and to accept the
token. Also the cost of applying 1 and 64 bitmask rows to fp32 logits: kvserve's kernel, torch, and each engine's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from kvserve.layers.token_bitmask import apply_token_bitmask_, apply_token_bitmask_torch_
from kvserve.models.default_model import default_model_path
from kvserve.tokenizer import load_tokenizer

VOCAB = 49152
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0},
        "email": {"type": "string"},
        "status": {"enum": ["active", "inactive", "banned"]},
        "address": {"type": "object", "properties": {"street": {"type": "string"}, "city": {"type": "string"},
                                                     "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["street", "city", "zip"], "additionalProperties": False},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
    },
    "required": ["name", "age", "email", "status", "address", "tags"],
    "additionalProperties": False,
}
INSTANCE = {"name": "Ada Lovelace", "age": 36, "email": "ada@example.com", "status": "active",
            "address": {"street": "12 St James's Square", "city": "London", "zip": "12345"}, "tags": ["math", "engines", "poetry"]}


def walk(ids: list[int], fill, accept) -> tuple[list[float], list[float]]:
    fills, accepts = [], []
    for token in ids:
        a = time.perf_counter()
        fill()
        b = time.perf_counter()
        assert accept(token), token
        fills.append(b - a)
        accepts.append(time.perf_counter() - b)
    return fills, accepts


def summary(tokenizer_s: float, compile_s: float, fills: list[float], accepts: list[float]) -> dict:
    return {"tokenizer_info_s": round(tokenizer_s, 3), "compile_ms": round(compile_s * 1e3, 2), "tokens": len(fills),
            "mask_us_median": round(statistics.median(fills) * 1e6, 1), "mask_us_mean": round(statistics.mean(fills) * 1e6, 1),
            "mask_us_max": round(max(fills) * 1e6, 1), "accept_us_mean": round(statistics.mean(accepts) * 1e6, 1)}


def run_xgrammar(tokenizer) -> dict:
    import xgrammar as xgr

    t0 = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=VOCAB, stop_token_ids=[tokenizer.eos_token_id])
    t1 = time.perf_counter()
    compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    t2 = time.perf_counter()
    grammar = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False)
    t3 = time.perf_counter()
    text = json.dumps(INSTANCE)  # xgrammar's compact JSON separates with ", " and ": "
    ids = tokenizer(text, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    matcher = xgr.GrammarMatcher(grammar)
    bitmask = xgr.allocate_token_bitmask(1, VOCAB)
    fills, accepts = walk(ids, lambda: matcher.fill_next_token_bitmask(bitmask, 0), matcher.accept_token)
    assert matcher.is_terminated()
    return summary(t1 - t0, t3 - t2, fills, accepts)


def run_llguidance(tokenizer) -> dict:
    import llguidance
    import llguidance.hf
    import llguidance.torch

    t0 = time.perf_counter()
    lltok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=VOCAB)
    t1 = time.perf_counter()
    matcher = llguidance.LLMatcher(lltok, llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA)))
    t2 = time.perf_counter()
    assert not matcher.is_error(), matcher.get_error()
    ids = tokenizer(json.dumps(INSTANCE, separators=(",", ":")), add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    bitmask = llguidance.torch.allocate_token_bitmask(1, VOCAB)
    fills, accepts = walk(ids, lambda: llguidance.torch.fill_next_token_bitmask(matcher, bitmask, 0), matcher.consume_token)
    return summary(t1 - t0, t2 - t1, fills, accepts)


def apply_costs() -> dict:
    import xgrammar as xgr

    result = {}
    for rows in (1, 64):
        logits = torch.randn(rows, VOCAB)
        bitmask = torch.randint(-(2**31), 2**31 - 1, (rows, VOCAB // 32), dtype=torch.int32)
        index = list(range(rows))
        candidates = {"kvserve": lambda: apply_token_bitmask_(logits, bitmask, index),
                      "torch (unpack + masked_fill)": lambda: apply_token_bitmask_torch_(logits, bitmask, index),
                      "xgrammar cpu": lambda: xgr.apply_token_bitmask_inplace(logits, bitmask, backend="cpu")}
        for name, fn in candidates.items():
            fn()
            start = time.perf_counter()
            for _ in range(20):
                fn()
            result[f"{name}, {rows} rows (us)"] = round((time.perf_counter() - start) / 20 * 1e6, 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    tokenizer = load_tokenizer(default_model_path())
    engines = {"xgrammar": run_xgrammar}
    try:
        import llguidance  # noqa: F401

        engines["llguidance"] = run_llguidance
    except ImportError:
        print("llguidance is not installed: xgrammar only")
    for _ in range(args.repeat):
        for name, run in engines.items():
            print(name, json.dumps(run(tokenizer)))
    print("apply", json.dumps(apply_costs()))


if __name__ == "__main__":
    main()
