"""`kvserve bench serve`: load an OpenAI-compatible server the way vLLM's serving benchmark does.

Requests are sent with Poisson arrivals at `--request-rate` (or all at once for
`inf`), each streaming from /v1/completions. Per request it records the time to
first token (TTFT), the gaps between streamed chunks (inter-token latency, ITL),
the time per output token after the first (TPOT) and the end-to-end latency;
token counts come from the server's usage report. The run is bounded in count
(`--num-prompts`) and in time (`--max-seconds`: requests still open then are
cancelled and counted as failed).

Random prompts are made of exactly `--input-len` token ids (via the server's
/tokenize; plain text when the server has none), each with a random start so
the prefix cache does not make them trivially cheap; outputs run
`--output-len` tokens with `ignore_eos`.

Any OpenAI-compatible server can be the target (`--url`): `kvserve serve`, vLLM,
or llama.cpp's `llama-server` (its /tokenize takes `{"content"}`, tried second),
so two servers are measured by the same client (docs/PERFORMANCE.md, W3).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

_WORDS = (
    "the of and to in is was for on that with as by at from his her they have one had not but what all were when "
    "we there can an your which their said if do will each about how up out them then she many some so these would "
    "other into has more two like him see time could no make than first been its who now people my made over did "
    "down only way find use may water long little very after words called just where most know get through back"
).split()


@dataclass
class BenchRequest:
    prompt: str | list[int]
    output_len: int


@dataclass
class RequestResult:
    success: bool = False
    error: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)


def add_bench_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="base URL of the server")
    parser.add_argument("--model-name", default=None, help="model name to send (default: the first of /v1/models)")
    parser.add_argument("--num-prompts", type=int, default=100)
    parser.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s, Poisson arrivals; inf sends all at once")
    parser.add_argument("--max-concurrency", type=int, default=None, help="at most this many requests in flight")
    parser.add_argument("--input-len", type=int, default=128, help="prompt tokens of random prompts")
    parser.add_argument("--output-len", type=int, default=128, help="generated tokens per request")
    parser.add_argument("--dataset", default=None,
                        help="JSON or JSONL file of {\"prompt\": ..., \"output_len\"?: N} objects, or ShareGPT conversations")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-seconds", type=float, default=600.0, help="stop the whole run after this long")
    parser.add_argument("--output", default=None, help="write the results as JSON to this file")


def run_bench_serve(args: argparse.Namespace) -> int:
    for name in ("num_prompts", "input_len", "output_len"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not args.request_rate > 0:
        raise ValueError(f"--request-rate must be > 0 (or inf), got {args.request_rate}")
    if args.max_seconds <= 0:
        raise ValueError(f"--max-seconds must be > 0, got {args.max_seconds}")
    results = asyncio.run(benchmark(args))
    print(format_report(results))
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    return 0 if results["completed"] > 0 else 1


async def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark described by `args` and return the summary (the JSON that is written)."""
    base = args.url.rstrip("/")
    rng = random.Random(args.seed)
    timeout = httpx.Timeout(args.max_seconds, connect=10.0)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=base, timeout=timeout, limits=limits) as client:
        model = args.model_name or await _first_model(client)
        if args.dataset:
            requests = load_dataset(args.dataset, args.num_prompts, args.output_len, rng)
        else:
            requests = await random_requests(client, model, args.num_prompts, args.input_len, args.output_len, rng)
        results, duration = await _send_all(client, model, requests, args, rng)
    summary = summarize(results, duration)
    summary.update(
        url=base, model=model, num_prompts=len(requests), request_rate=args.request_rate,
        max_concurrency=args.max_concurrency, dataset=args.dataset,
        input_len=None if args.dataset else args.input_len, output_len=args.output_len, seed=args.seed,
    )
    return summary


async def _first_model(client: httpx.AsyncClient) -> str:
    response = await client.get("/v1/models")
    response.raise_for_status()
    return response.json()["data"][0]["id"]


async def random_requests(
    client: httpx.AsyncClient, model: str, num: int, input_len: int, output_len: int, rng: random.Random
) -> list[BenchRequest]:
    """`num` prompts of exactly `input_len` tokens, each cut at a random offset of one long random text."""
    text = " ".join(rng.choice(_WORDS) for _ in range(input_len * 2 + 64))
    ids = await tokenize(client, model, text)
    if not ids:  # no /tokenize: fall back to text of about the right length
        return [BenchRequest(" ".join(rng.choice(_WORDS) for _ in range(input_len)), output_len) for _ in range(num)]
    while len(ids) < 2 * input_len:
        ids = ids + ids
    requests = []
    for _ in range(num):
        start = rng.randrange(0, len(ids) - input_len + 1)
        requests.append(BenchRequest(ids[start : start + input_len], output_len))
    return requests


async def tokenize(client: httpx.AsyncClient, model: str, text: str) -> list[int]:
    """Token ids of ``text`` from the server's /tokenize, or [] when it has none.

    kvserve and vLLM read ``{"prompt"}``; llama-server reads ``{"content"}`` (and
    answers a request without it with no tokens), so both forms are tried.
    """
    for body in ({"model": model, "prompt": text, "add_special_tokens": False},
                 {"content": text, "add_special": False}):
        try:
            response = await client.post("/tokenize", json=body)
        except httpx.HTTPError:
            return []
        if response.status_code == 200:
            tokens = response.json().get("tokens") or []
            if tokens and all(isinstance(t, int) for t in tokens):
                return tokens
    return []


def load_dataset(path: str, num: int, default_output_len: int, rng: random.Random) -> list[BenchRequest]:
    """Prompts from a JSON list / JSONL of {"prompt", "output_len"?} or ShareGPT {"conversations": [...]} records."""
    raw = Path(path).read_text()
    try:
        records = json.loads(raw)
    except json.JSONDecodeError:
        records = [json.loads(line) for line in raw.splitlines() if line.strip()]
    if isinstance(records, dict):
        records = [records]
    requests = []
    for record in records:
        prompt = record.get("prompt")
        if prompt is None and record.get("conversations"):
            prompt = record["conversations"][0].get("value")
        if isinstance(prompt, str) and prompt:
            requests.append(BenchRequest(prompt, int(record.get("output_len") or default_output_len)))
    if not requests:
        raise ValueError(f"--dataset {path} holds no usable prompt (records need a \"prompt\" string or ShareGPT conversations)")
    rng.shuffle(requests)
    return [requests[i % len(requests)] for i in range(num)]


async def _send_all(
    client: httpx.AsyncClient, model: str, requests: list[BenchRequest], args: argparse.Namespace, rng: random.Random
) -> tuple[list[RequestResult], float]:
    semaphore = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
    started = time.perf_counter()
    deadline = started + args.max_seconds

    async def one(request: BenchRequest) -> RequestResult:
        if semaphore is None:
            return await send_request(client, model, request)
        async with semaphore:
            return await send_request(client, model, request)

    tasks = []
    for request in requests:
        if time.perf_counter() >= deadline:
            break
        tasks.append(asyncio.create_task(one(request)))
        if args.request_rate != float("inf"):
            await asyncio.sleep(min(rng.expovariate(args.request_rate), max(0.0, deadline - time.perf_counter())))
    done, pending = await asyncio.wait(tasks, timeout=max(0.0, deadline - time.perf_counter())) if tasks else (set(), set())
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    duration = time.perf_counter() - started
    results = [t.result() if t in done else RequestResult(error="cancelled at --max-seconds") for t in tasks]
    results += [RequestResult(error="not sent before --max-seconds") for _ in requests[len(tasks) :]]
    return results, duration


async def send_request(client: httpx.AsyncClient, model: str, request: BenchRequest) -> RequestResult:
    """Stream one completion; time its chunks."""
    body = {
        "model": model, "prompt": request.prompt, "max_tokens": request.output_len, "temperature": 0.0,
        "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
    }
    result = RequestResult()
    started = last = time.perf_counter()
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread()).decode(errors='replace')[:200]}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = chunk["error"].get("message", "error")
                    return result
                if chunk.get("usage"):
                    result.prompt_tokens = chunk["usage"]["prompt_tokens"]
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                if any(c.get("text") for c in chunk.get("choices", [])):
                    now = time.perf_counter()
                    if result.ttft == 0.0:
                        result.ttft = now - started
                    else:
                        result.itl.append(now - last)
                    last = now
        result.latency = time.perf_counter() - started
        result.success = result.output_tokens > 0
        if not result.success:
            result.error = "no usage report or no output tokens"
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    return result


def summarize(results: list[RequestResult], duration: float) -> dict[str, Any]:
    """Throughputs and latency statistics in vLLM's field names (milliseconds for latencies)."""
    ok = [r for r in results if r.success]
    input_tokens = sum(r.prompt_tokens for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    summary: dict[str, Any] = {
        "duration": duration,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(ok) / duration if duration > 0 else 0.0,
        "input_throughput": input_tokens / duration if duration > 0 else 0.0,
        "output_throughput": output_tokens / duration if duration > 0 else 0.0,
        "total_token_throughput": (input_tokens + output_tokens) / duration if duration > 0 else 0.0,
    }
    series = {
        "ttft": [r.ttft for r in ok],
        "tpot": tpots,
        "itl": [gap for r in ok for gap in r.itl],
        "e2el": [r.latency for r in ok],
    }
    for name, values in series.items():
        ms = np.asarray(values, dtype=float) * 1000.0
        for stat, fn in (("mean", np.mean), ("median", np.median)):
            summary[f"{stat}_{name}_ms"] = float(fn(ms)) if ms.size else None
        summary[f"p99_{name}_ms"] = float(np.percentile(ms, 99)) if ms.size else None
    summary["errors"] = sorted({r.error for r in results if r.error})[:10]
    return summary


def format_report(summary: dict[str, Any]) -> str:
    def number(value: Any) -> str:
        return "n/a" if value is None else f"{value:.2f}" if isinstance(value, float) else str(value)

    lines = ["============ Serving Benchmark Result ============"]
    rows = [
        ("Successful requests", "completed"), ("Failed requests", "failed"), ("Benchmark duration (s)", "duration"),
        ("Total input tokens", "total_input_tokens"), ("Total generated tokens", "total_output_tokens"),
        ("Request throughput (req/s)", "request_throughput"), ("Input token throughput (tok/s)", "input_throughput"),
        ("Output token throughput (tok/s)", "output_throughput"), ("Total token throughput (tok/s)", "total_token_throughput"),
    ]
    for title, name in (("Time to First Token", "ttft"), ("Time per Output Token (excl. 1st token)", "tpot"),
                        ("Inter-token Latency", "itl"), ("End-to-end Latency", "e2el")):
        rows.append((f"-{title}-", None))
        rows += [(f"{stat.capitalize()} {name.upper()} (ms)", f"{stat}_{name}_ms") for stat in ("mean", "median", "p99")]
    for title, name in rows:
        lines.append(f"{title:-^50}" if name is None else f"{title:<40} {number(summary.get(name)):>9}")
    if summary.get("errors"):
        lines.append("errors: " + "; ".join(summary["errors"]))
    lines.append("=" * 50)
    return "\n".join(lines)

