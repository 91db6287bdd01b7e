"""What constrained decoding costs on the default model (SmolLM2-135M-Instruct, Q4_1 GGUF; docs/STRUCTURED_OUTPUT.md).

    python benchmarks/structured_output.py [--batch 1 64] [--tokens 64] [--rounds 3]

1. Compile latency: the first constraint an engine sees (xgrammar imported, the vocabulary indexed, the schema
   compiled), a new schema after that, the same schema again (xgrammar's cache); and the time to the first
   token of a request with a schema never seen (compiled when it is added) against an unconstrained one.
2. Per-token overhead at batch 1 and 64: B requests decoding together, every one under a JSON schema whose one
   string property must be at least 400 characters long (so none ends early: the mask is computed every step,
   inside a JSON string, the common case), against the same B prompts unconstrained (ignore_eos). Rounds
   alternate plain / constrained; reported: the median full-batch decode step of each, and the overhead as a
   share of the constrained step. Also the parts, timed alone on B matchers inside that string: filling the
   B bitmask rows (scheduler side), applying them to [B, 49152] fp32 logits (sampler), accepting B tokens.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from kvserve import LLM, SamplingParams
from kvserve.layers.token_bitmask import apply_token_bitmask_
from kvserve.sampling_params import StructuredOutputsParams
from kvserve.structured_output.grammar_state import grammar_bitmask

STORY = {"type": "object", "properties": {"story": {"type": "string", "minLength": 400}}, "required": ["story"]}
FIRST = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "tags": {"type": "array", "items": {"type": "string"}}},
         "required": ["name", "age", "tags"]}
SECOND = {"type": "object", "properties": {"city": {"type": "string"}, "weather": {"enum": ["sunny", "rainy"]}}, "required": ["city", "weather"]}
PROMPT = [{"role": "user", "content": "Tell me a long story about a dragon, as JSON."}]


def compile_latency(llm: LLM) -> dict:
    compiler = llm.llm_engine.grammar_compiler
    text = "Tell me a long story about a dragon, as JSON: "
    llm.generate([text], SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)  # warm-up: nothing below pays first-run costs
    result = {}
    for name, schema in (("first constraint (import + vocabulary + compile) ms", FIRST), ("new schema ms", SECOND),
                         ("same schema again ms", SECOND)):
        start = time.perf_counter()
        compiler.compile(StructuredOutputsParams(json=schema))
        result[name] = round((time.perf_counter() - start) * 1e3, 2)
    plain, constrained = [], []
    for i in range(5):  # medians: the engine has one-time stalls of its own in its first requests
        for times, constraint in ((plain, None), (constrained, StructuredOutputsParams(json={**FIRST, "title": f"new {i}"}))):
            start = time.perf_counter()
            llm.generate([text], SamplingParams(temperature=0.0, max_tokens=1, structured_outputs=constraint), use_tqdm=False)
            times.append(time.perf_counter() - start)
    result["TTFT unconstrained ms (median of 5)"] = round(statistics.median(plain) * 1e3, 1)
    result["TTFT with a new schema ms (median of 5)"] = round(statistics.median(constrained) * 1e3, 1)
    return result


def decode_steps(llm: LLM, batch: int, tokens: int, constrained: bool) -> list[float]:
    """Durations of the steps in which all `batch` requests decode (no prefill in the step)."""
    engine = llm.llm_engine
    constraint = StructuredOutputsParams(json=STORY) if constrained else None
    prompt_ids = engine.tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True)
    prompt_ids = prompt_ids if isinstance(prompt_ids, list) else prompt_ids["input_ids"]
    for i in range(batch):
        params = SamplingParams(temperature=0.7, seed=i, max_tokens=tokens, ignore_eos=not constrained, structured_outputs=constraint)
        engine.add_request(f"r{i}-{constrained}", None, params, prompt_token_ids=list(prompt_ids))
    steps = []
    while engine.has_unfinished_requests():
        engine.step()
        last = engine.last_step
        if last.num_seqs == batch and last.num_prefill_tokens == 0:
            steps.append(last.duration_s)
    return steps


def parts(llm: LLM, batch: int) -> dict:
    """Mask fill, mask application and token acceptance for `batch` matchers inside the story string."""
    engine = llm.llm_engine
    states = [engine.grammar_compiler.new_state(StructuredOutputsParams(json=STORY)) for _ in range(batch)]
    prefix = engine.tokenizer.encode('{"story": "Once upon a time', add_special_tokens=False)
    for state in states:
        assert all(state.accept(t) for t in prefix)
    logits = torch.randn(batch, engine.hf_config.vocab_size)
    token = engine.tokenizer.encode(" there", add_special_tokens=False)[0]
    fill, apply, accept = [], [], []
    for _ in range(50):
        a = time.perf_counter()
        bitmask = grammar_bitmask(states)
        b = time.perf_counter()
        apply_token_bitmask_(logits, bitmask, list(range(batch)))
        c = time.perf_counter()
        for state in states:
            state.accept(token)
        d = time.perf_counter()
        for state in states:
            state.rollback(1)
        fill.append(b - a)
        apply.append(c - b)
        accept.append(d - c)
    return {"fill ms": round(statistics.median(fill) * 1e3, 3), "apply ms": round(statistics.median(apply) * 1e3, 3),
            "accept ms": round(statistics.median(accept) * 1e3, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    llm = LLM(max_num_seqs=max(args.batch))
    print("compile", json.dumps(compile_latency(llm)))
    for batch in args.batch:
        plain, constrained = [], []
        for _ in range(args.rounds):
            plain += decode_steps(llm, batch, args.tokens, constrained=False)
            constrained += decode_steps(llm, batch, args.tokens, constrained=True)
        p, c = statistics.median(plain), statistics.median(constrained)
        print(f"batch {batch}", json.dumps({"plain step ms": round(p * 1e3, 2), "constrained step ms": round(c * 1e3, 2),
                                            "overhead share of step": round((c - p) / c, 3), "steps": [len(plain), len(constrained)],
                                            **parts(llm, batch)}))


if __name__ == "__main__":
    main()
