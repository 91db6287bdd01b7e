"""What every ablation shares: the engine at a dummy shape, request timing, tables and figures."""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from kvserve.estimate.model_shape import ModelShape

DTYPE = "float32"  # the fast CPU dtype; the KV cache uses it too


@dataclass
class AblationResult:
    """One ablation's outcome: markdown tables, findings, a figure, and the key numbers.

    ``metrics`` holds the headline numbers for programs (written to ``results.json``).
    """

    name: str
    title: str
    claim: str
    tables: list[str]
    findings: list[str]
    figure: Figure
    setup: str = ""
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class RequestTrace:
    """When one request arrived and when each of its tokens came out (perf_counter seconds)."""

    arrival: float
    token_times: list[float] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.arrival

    @property
    def latency(self) -> float:
        return self.token_times[-1] - self.arrival

    @property
    def inter_token_latencies(self) -> list[tuple[float, float]]:
        """``(end time, gap)`` between consecutive tokens."""
        times = self.token_times
        return [(b, b - a) for a, b in zip(times, times[1:])]


class AblationContext:
    """The model shape, sizes (full or smoke), random prompts and engines for the ablations."""

    def __init__(self, shape: ModelShape, smoke: bool, scratch: Path, seed: int = 0) -> None:
        self.shape = shape
        self.smoke = smoke
        self.scratch = scratch
        self.rng = random.Random(seed)
        self._model_dirs: dict[ModelShape, Path] = {}
        self._request_count = 0

    def size(self, full: Any, smoke: Any) -> Any:
        """``smoke`` in smoke mode, else ``full``."""
        return smoke if self.smoke else full

    def prompt(self, length: int, vocab_size: int | None = None) -> list[int]:
        """Random token ids (never the tokenizer's special ids 0 and 1)."""
        vocab = vocab_size or self.shape.vocab_size
        return [self.rng.randrange(2, vocab) for _ in range(length)]

    def model_dir(self, shape: ModelShape) -> Path:
        if shape not in self._model_dirs:
            from kvserve.estimate.dummy_model import write_dummy_model_dir

            directory = self.scratch / f"model-{len(self._model_dirs)}"
            self._model_dirs[shape] = write_dummy_model_dir(shape, directory)
        return self._model_dirs[shape]

    def kv_bytes_per_token(self, shape: ModelShape | None = None) -> int:
        shape = shape or self.shape
        return 2 * shape.num_layers * shape.kv_size * 4  # float32

    def engine(self, shape: ModelShape | None = None, warm_up: bool = True,
               **config: Any) -> Any:
        """An LLMEngine with random weights at ``shape`` (default: the context's shape).

        ``config`` goes to :class:`~kvserve.config.EngineConfig`. Unless told
        otherwise, prefix caching is off (so runs do not help each other) and the
        KV cache is a modest 64 MiB, not the engine's CPU default of several GiB.
        """
        from kvserve.config import EngineConfig
        from kvserve.engine.llm_engine import LLMEngine

        shape = shape or self.shape
        config.setdefault("enable_prefix_caching", False)
        if "num_gpu_blocks_override" not in config:
            config.setdefault("kv_cache_memory_bytes", 64 * 2**20)
        engine = LLMEngine(EngineConfig(model=str(self.model_dir(shape)), load_format="dummy",
                                        dtype=DTYPE, **config))
        if warm_up:
            # The first forwards of a process pay one-off costs; keep them out of timings.
            for length in (8, 64):
                self.submit(engine, {}, self.prompt(length, shape.vocab_size), 3)
            run_until_done(engine, {})
        return engine

    def submit(self, engine: Any, traces: dict[str, RequestTrace], prompt: list[int],
               max_tokens: int) -> str:
        """Add a greedy request that ignores EOS; its trace goes into ``traces``."""
        from kvserve.sampling_params import SamplingParams

        self._request_count += 1
        request_id = f"ablation-{self._request_count}"
        engine.add_request(request_id, prompt, SamplingParams(
            max_tokens=max_tokens, ignore_eos=True, temperature=0.0))
        traces[request_id] = RequestTrace(time.perf_counter())
        return request_id

    def bar(self, total: int | None, desc: str) -> Any:
        """A tqdm bar on stderr (hidden when stderr is not a terminal)."""
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit="step", leave=False, disable=None)


def engine_step(engine: Any, traces: dict[str, RequestTrace]) -> list[Any]:
    """One engine step; every output stamps a token time on its request's trace."""
    outputs = engine.step()
    now = time.perf_counter()
    for out in outputs:
        trace = traces.get(out.request_id)
        if trace is not None:
            trace.token_times.append(now)
            trace.token_ids = list(out.outputs[0].token_ids)
    return outputs


def run_until_done(engine: Any, traces: dict[str, RequestTrace], bar: Any = None,
                   on_step: Callable[[Any], None] | None = None) -> None:
    """Step until every request has finished."""
    while engine.has_unfinished_requests():
        engine_step(engine, traces)
        if on_step is not None:
            on_step(engine)
        if bar is not None:
            bar.update(1)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100), linear between order statistics."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def mean(values: Sequence[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; numbers should already be formatted as strings."""
    lines = ["| " + " | ".join(headers) + " |",
             "| " + " | ".join("---" if i == 0 else "---:" for i in range(len(headers))) + " |"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def new_figure(num_axes: int, title: str) -> tuple[Figure, list[Any]]:
    """A figure with ``num_axes`` side-by-side plots (Agg canvas, no pyplot state)."""
    figure = Figure(figsize=(5.2 * num_axes, 4.0), layout="constrained")
    axes = figure.subplots(1, num_axes, squeeze=False)[0].tolist()
    figure.suptitle(title)
    for ax in axes:
        ax.grid(True, alpha=0.3)
    return figure, axes


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.1f}"
