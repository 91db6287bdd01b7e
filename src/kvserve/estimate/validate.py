"""``kvserve estimate --validate``: the estimate next to what the engine does on this machine.

The engine is built at the estimated shape (a model directory, or random
``load_format="dummy"`` weights for ``--preset``/``--config``) with the same KV
byte budget and block size the estimator is given, so the predicted KV cache
(bytes and tokens) must equal the allocation exactly. Step times are then
measured and reported as multiples of the roofline floors computed from the
``local`` hardware numbers: prefill of one ``--input-len`` prompt, and decode
steps at each batch of ``--validate-batches`` with ``--validate-context`` tokens
of context per sequence. Step times are medians of a few steps, taken after
warm-up steps that are not counted.

With ``--num-devices N`` (N > 1) a second engine runs the model tensor parallel on N
ranks (spawned processes, gloo), and a tensor-parallel section checks the estimator's
arithmetic against it: weights and KV bytes per rank, and the communication term,
2 all-reduces per layer of batch × hidden × dtype bytes, each costing the link's
latency plus 2(N−1)/N of its bytes over its bandwidth, with the latency and
bandwidth fitted to all-reduces of two sizes timed on the ranks' own group.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from kvserve.estimate.arguments import estimate_params_from_args
from kvserve.estimate.hardware import Hardware, get_hardware
from kvserve.estimate.model_shape import ModelShape
from kvserve.estimate.report import format_seconds, report_meta
from kvserve.estimate.roofline import DTYPE_BYTES, EstimateParams, StepFloor, estimate, kv_bytes_per_token, tp_comm_seconds
from kvserve.estimate.shape_loader import load_model_shape

DEFAULT_PRESET = "smollm2-135m"
DEFAULT_BATCHES = (1, 8, 64)
DEFAULT_CONTEXT = 32
PREFILL_REPEATS = 3
DECODE_WARMUP_STEPS = 1
DECODE_MEASURED_STEPS = 4
_ENGINE_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
_ENGINE_KV_CACHE_DTYPES = {"int8": "int8", "fp8": "fp8_e4m3"}  # --kv-dtype -> the engine's --kv-cache-dtype


def add_validate_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``--validate`` options of ``kvserve estimate``."""
    group = parser.add_argument_group("validation against the engine (--validate)")
    group.add_argument("--validate", action="store_true",
                       help="run the engine on this machine and print predicted vs measured "
                            f"(default model: --preset {DEFAULT_PRESET} with dummy weights)")
    group.add_argument("--load-format", choices=("auto", "dummy"), default=None,
                       help="weights for --model DIR: auto (the checkpoint) or dummy (random); "
                            "--preset and --config always use dummy weights")
    group.add_argument("--validate-batches", metavar="B,B,...", default=None,
                       help="decode batch sizes to time (default: "
                            f"{','.join(map(str, DEFAULT_BATCHES))})")
    group.add_argument("--validate-context", metavar="TOKENS", type=int, default=None,
                       help="context tokens per sequence in the timed decode steps "
                            f"(default: {DEFAULT_CONTEXT})")


@dataclass(frozen=True)
class TimedStep:
    """A measured step time next to its roofline floor."""

    label: str
    batch: int
    tokens: int
    floor: StepFloor
    measured_s: float
    samples_s: list[float]

    @property
    def ratio(self) -> float:
        return self.measured_s / self.floor.seconds

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "batch": self.batch, "tokens": self.tokens,
                "floor": self.floor.to_dict(), "measured_s": self.measured_s,
                "samples_s": self.samples_s, "ratio": self.ratio}


@dataclass(frozen=True)
class TensorParallelCheck:
    """The estimator's tensor-parallel terms next to an engine running on `ranks` ranks."""

    ranks: int
    latency_s: float  # of one all-reduce, fitted
    bandwidth: float  # bytes/s, fitted
    predicted_params_per_rank: int  # the model's parameters / ranks
    measured_params_per_rank: list[int]
    predicted_kv_bytes_per_rank: int
    measured_kv_bytes_per_rank: list[int]
    comm: list[tuple[int, float, float]]  # (decode batch, predicted all-reduce s/step, measured s/step on rank 0)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Validation:
    """Predicted and measured sizes and step times of one engine run."""

    shape: ModelShape
    hardware: Hardware
    engine_dtype: str
    kv_cache_dtype: str  # the engine's --kv-cache-dtype: auto (engine_dtype), int8 or fp8_e4m3
    load_format: str
    block_size: int
    kv_budget_bytes: int
    predicted_kv_bytes: int
    measured_kv_bytes: int
    predicted_kv_tokens: int
    measured_kv_tokens: int
    predicted_params: int
    measured_params: int
    prefill: TimedStep
    decode: list[TimedStep]
    tensor_parallel: TensorParallelCheck | None = None

    @property
    def kv_matches(self) -> bool:
        return (self.predicted_kv_bytes == self.measured_kv_bytes
                and self.predicted_kv_tokens == self.measured_kv_tokens)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": {**asdict(self.shape), "attention_kind": self.shape.attention_kind},
            "hardware": self.hardware.to_dict(),
            "engine": {"dtype": self.engine_dtype, "kv_cache_dtype": self.kv_cache_dtype,
                       "load_format": self.load_format,
                       "block_size": self.block_size,
                       "kv_cache_memory_bytes": self.kv_budget_bytes},
            "kv_cache": {"predicted_bytes": self.predicted_kv_bytes,
                         "measured_bytes": self.measured_kv_bytes,
                         "predicted_tokens": self.predicted_kv_tokens,
                         "measured_tokens": self.measured_kv_tokens,
                         "match": self.kv_matches},
            "parameters": {"predicted": self.predicted_params, "measured": self.measured_params},
            "prefill": self.prefill.to_dict(),
            "decode": [step.to_dict() for step in self.decode],
            "tensor_parallel": self.tensor_parallel.to_dict() if self.tensor_parallel else None,
        }


def run_validate(args: argparse.Namespace) -> int:
    """``kvserve estimate --validate``: 0 when the KV cache matches, 1 when not, 2 on bad input."""
    try:
        if args.hardware != "local":
            raise ValueError(f"hardware: got {args.hardware!r}; --validate measures this "
                             "machine, so the floors use --hardware local")
        ranks = args.num_devices
        batches = parse_batches(args.validate_batches)
        context = args.validate_context or DEFAULT_CONTEXT
        if context < 1:
            raise ValueError(f"validate_context: got {context}; must be an integer >= 1")
        if args.model is None and args.config is None and args.preset is None:
            args.preset = DEFAULT_PRESET
        shape = load_model_shape(model=args.model, config=args.config, preset=args.preset)
        params = replace(estimate_params_from_args(args), num_devices=1)
        with tempfile.TemporaryDirectory(prefix="kvserve-validate-") as scratch:
            model_dir, load_format = _model_dir(args, shape, Path(scratch))
            result = validate(shape, model_dir, load_format, params, batches, context, ranks)
    except ValueError as error:
        print(f"kvserve estimate: error: {error}", file=sys.stderr)
        return 2
    meta = report_meta(args)
    if args.json:
        print(json.dumps({"meta": meta, **result.to_dict()}, indent=2))
    else:
        print(format_validation(result, meta))
    return 0 if result.kv_matches else 1


def parse_batches(text: str | None) -> tuple[int, ...]:
    """``"1,8,64"`` → ``(1, 8, 64)``; None gives the default batches."""
    if text is None:
        return DEFAULT_BATCHES
    try:
        batches = tuple(int(part) for part in text.split(","))
    except ValueError:
        batches = ()
    if not batches or min(batches) < 1:
        raise ValueError(f"validate_batches: got {text!r}; expected positive integers "
                         "separated by commas, e.g. 1,8,64")
    return batches


def _model_dir(args: argparse.Namespace, shape: ModelShape, scratch: Path) -> tuple[str, str]:
    """The engine's model directory and load format: the given one, or a dummy one."""
    if args.model is not None:
        return str(args.model), args.load_format or "auto"
    if args.load_format not in (None, "dummy"):
        raise ValueError(f"load_format: got {args.load_format!r}; --preset and --config have "
                         "no weights, so the allowed value is dummy")
    from kvserve.estimate.dummy_model import write_dummy_model_dir

    return str(write_dummy_model_dir(shape, scratch / "model")), "dummy"


def validate(shape: ModelShape, model_dir: str, load_format: str, params: EstimateParams,
             batches: tuple[int, ...], context: int, ranks: int = 1) -> Validation:
    """Build the engine at ``shape`` and measure it against the estimate on local hardware (and, for
    ``ranks`` > 1, tensor parallel on that many ranks)."""
    from tqdm import tqdm

    hardware = get_hardware("local")
    compute, weights_dtype, kv_dtype = params.resolved_dtypes(hardware)
    if compute != weights_dtype or kv_dtype not in (compute, *_ENGINE_KV_CACHE_DTYPES):
        raise ValueError(f"dtype: the engine keeps weights and KV cache in its compute dtype (the KV cache may be "
                         f"{' or '.join(_ENGINE_KV_CACHE_DTYPES)} instead); got dtype {compute}, weights_dtype "
                         f"{weights_dtype}, kv_dtype {kv_dtype}")
    kv_cache_dtype = _ENGINE_KV_CACHE_DTYPES.get(kv_dtype, "auto")
    decode_tokens = DECODE_WARMUP_STEPS + DECODE_MEASURED_STEPS + 8
    if params.kv_cache_memory_bytes is None:
        needed = max(max(batches) * _round_up(context + decode_tokens + 1, params.block_size),
                     _round_up(params.input_len + 2, params.block_size))
        budget = math.ceil(1.1 * needed * kv_bytes_per_token(shape, kv_dtype) / 2**20) * 2**20
        params = replace(params, kv_cache_memory_bytes=budget)
    predicted = estimate(shape, hardware, params)
    max_model_len = min(shape.max_position_embeddings, predicted.kv_cache_tokens)
    engine = _build_engine(model_dir, load_format, compute, kv_cache_dtype, params, max(batches), max_model_len)
    runner = Measurer(engine, seed=0)
    with tqdm(total=2 + len(batches), desc="validating", unit="phase", disable=None) as bar:
        runner.warm_up()
        bar.update()
        samples = runner.prefill_times(params.input_len, PREFILL_REPEATS)
        prefill = TimedStep(f"prefill 1 × {params.input_len}", 1, params.input_len,
                            estimate(shape, hardware, replace(params, batch=1)).prefill,
                            statistics.median(samples), samples)
        bar.update()
        decode = []
        for batch in batches:
            samples = runner.decode_times(batch, context, decode_tokens)
            # The timed steps see context + warm-up + 1..measured tokens; the floor's
            # mean context is input_len + output_len / 2.
            at = replace(params, batch=batch, input_len=context + DECODE_WARMUP_STEPS + 1,
                         output_len=DECODE_MEASURED_STEPS - 1)
            decode.append(TimedStep(f"decode batch {batch}", batch, batch,
                                    estimate(shape, hardware, at).decode,
                                    statistics.median(samples), samples))
            bar.update()
    info, stats = engine.worker_info, engine.stats()
    engine.shutdown()
    tensor_parallel = None
    if ranks > 1:
        tensor_parallel = _validate_tensor_parallel(shape, model_dir, load_format, compute, kv_cache_dtype, params,
                                                    batches, context, max_model_len, ranks, kv_dtype)
    return Validation(
        shape=shape, hardware=hardware, engine_dtype=_ENGINE_DTYPES[compute], kv_cache_dtype=kv_cache_dtype,
        load_format=load_format, block_size=params.block_size,
        kv_budget_bytes=int(params.kv_cache_memory_bytes),
        predicted_kv_bytes=int(predicted.kv_cache_bytes), measured_kv_bytes=info.kv_cache_bytes,
        predicted_kv_tokens=predicted.kv_cache_tokens,
        measured_kv_tokens=stats.num_blocks * stats.block_size,
        predicted_params=shape.num_params,
        measured_params=info.num_parameters,
        prefill=prefill, decode=decode, tensor_parallel=tensor_parallel,
    )


def _validate_tensor_parallel(shape: ModelShape, model_dir: str, load_format: str, compute: str, kv_cache_dtype: str,
                              params: EstimateParams, batches: tuple[int, ...], context: int, max_model_len: int,
                              ranks: int, kv_dtype: str) -> TensorParallelCheck:
    """The same model on `ranks` tensor-parallel ranks: memory per rank and all-reduce time per decode step."""
    engine = _build_engine(model_dir, load_format, compute, kv_cache_dtype, params, max(batches), max_model_len, ranks)
    try:
        element = DTYPE_BYTES[compute]
        small, large = shape.hidden_size, 64 * shape.hidden_size
        timed = engine.executor.time_all_reduce([small, large])
        ring = 2 * (ranks - 1) / ranks
        bandwidth = ring * (large - small) * element / max(timed[large] - timed[small], 1e-9)
        latency = max(timed[small] - ring * small * element / bandwidth, 0.0)
        runner = Measurer(engine, seed=0)
        runner.warm_up()
        comm = []
        decode_tokens = DECODE_WARMUP_STEPS + DECODE_MEASURED_STEPS + 8
        for batch in batches:
            runner.decode_times(batch, context, decode_tokens)
            before, after = runner.timed_window
            spent = after.comm.seconds.get("all_reduce", 0.0) - before.comm.seconds.get("all_reduce", 0.0)
            predicted = tp_comm_seconds(shape, batch, element, ranks, bandwidth, latency)
            comm.append((batch, predicted, spent / DECODE_MEASURED_STEPS))
        infos = engine.rank_infos()
    finally:
        engine.shutdown()
    # the KV budget is per rank, and each rank holds 1/ranks of the KV heads (one of them when fewer than ranks)
    per_block = kv_bytes_per_token(shape, kv_dtype) * max(1, shape.num_kv_heads // ranks) // shape.num_kv_heads * params.block_size
    return TensorParallelCheck(
        ranks, latency, bandwidth, shape.num_params // ranks, [i.num_parameters for i in infos],
        int(params.kv_cache_memory_bytes) // per_block * per_block, [i.kv_cache_bytes for i in infos], comm,
    )


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _build_engine(model_dir: str, load_format: str, compute_dtype: str, kv_cache_dtype: str, params: EstimateParams,
                  max_batch: int, max_model_len: int, ranks: int = 1) -> Any:
    from kvserve.config import EngineConfig
    from kvserve.engine.llm_engine import LLMEngine

    return LLMEngine(EngineConfig(
        model=model_dir, load_format=load_format, dtype=_ENGINE_DTYPES[compute_dtype], kv_cache_dtype=kv_cache_dtype,
        kv_cache_memory_bytes=int(params.kv_cache_memory_bytes), block_size=params.block_size,
        max_num_seqs=max(max_batch, 1), max_num_batched_tokens=max(2048, params.input_len + 1),
        enable_prefix_caching=False, max_model_len=max_model_len, sliding_window=params.sliding_window,
        attention_sinks=params.attention_sinks, tensor_parallel_size=ranks,
    ))


class Measurer:
    """Times engine steps on random prompts (distinct, so nothing is shared between them)."""

    def __init__(self, engine: Any, seed: int) -> None:
        import random

        self.engine = engine
        self.rng = random.Random(seed)
        self.count = 0
        self.timed_window: tuple[Any, Any] | None = None

    def _prompt(self, length: int) -> list[int]:
        vocab = self.engine.hf_config.vocab_size
        return [self.rng.randrange(2, vocab) for _ in range(length)]

    def _add(self, prompt_len: int, max_tokens: int) -> str:
        from kvserve.sampling_params import SamplingParams

        self.count += 1
        request_id = f"validate-{self.count}"
        self.engine.add_request(request_id, self._prompt(prompt_len),
                                SamplingParams(max_tokens=max_tokens, ignore_eos=True,
                                               temperature=0.0))
        return request_id

    def _finish(self) -> None:
        while self.engine.has_unfinished_requests():
            self.engine.step()

    def warm_up(self) -> None:
        """First calls pay one-off costs (allocator, kernel selection): run them untimed."""
        self._add(16, 4)
        self._add(64, 2)
        self._finish()

    def prefill_times(self, prompt_len: int, repeats: int) -> list[float]:
        """Seconds of the step that prefills one ``prompt_len`` prompt, ``repeats`` times."""
        times = []
        for _ in range(repeats):
            self._add(prompt_len, 1)
            self.engine.step()
            times.append(self.engine.last_step.duration_s)
            self._finish()
        return times

    def decode_times(self, batch: int, context: int, max_tokens: int) -> list[float]:
        """Seconds of decode steps with ``batch`` sequences running, after all are prefilled."""
        ids = [self._add(context, max_tokens) for _ in range(batch)]
        engine = self.engine
        while True:
            engine.step()
            if engine.last_step.num_prefill_tokens == 0 and engine.last_step.num_seqs == batch:
                break
        times = []
        for index in range(DECODE_WARMUP_STEPS - 1 + DECODE_MEASURED_STEPS):
            if index == DECODE_WARMUP_STEPS - 1:
                timed_from = engine.rank_infos()[0]
            engine.step()
            if engine.last_step.num_seqs != batch or engine.last_step.num_prefill_tokens:
                raise RuntimeError(f"decode batch {batch}: a step ran {engine.last_step}; "
                                   "the KV cache is too small for the batch")
            if index >= DECODE_WARMUP_STEPS - 1:
                times.append(engine.last_step.duration_s)
        self.timed_window = (timed_from, engine.rank_infos()[0])  # what rank 0 reported around the timed steps
        for request_id in ids:
            engine.abort_request(request_id)
        return times


def format_validation(result: Validation, meta: dict[str, str]) -> str:
    """Predicted vs measured, one row per quantity."""
    s, hw = result.shape, result.hardware
    lines = [
        f"kvserve estimate --validate: {s.name} on this machine",
        f"  {meta['date']} · machine {meta['machine']}",
        f"  {meta['command']}",
        "",
        f"Model  {s.name}: {s.num_layers} layers, hidden {s.hidden_size}, {s.attention_kind} "
        f"({s.num_heads} heads, {s.num_kv_heads} kv heads × {s.head_dim}), {result.engine_dtype}, "
        f"KV cache {result.engine_dtype if result.kv_cache_dtype == 'auto' else result.kv_cache_dtype}, "
        f"{result.load_format} weights",
        f"Local hardware  {hw.memory_bandwidth / 1e9:,.1f} GB/s read, "
        + ", ".join(f"{d} {f / 1e9:,.1f} GFLOP/s" for d, f in hw.peak_flops.items())
        + f" (measured {hw.measured_at})",
        f"KV budget  kv_cache_memory_bytes = {result.kv_budget_bytes:,} B, "
        f"block size {result.block_size}",
        "",
    ]
    rows = [("", "predicted", "measured", "check"),
            ("KV cache bytes", f"{result.predicted_kv_bytes:,}", f"{result.measured_kv_bytes:,}",
             _same(result.predicted_kv_bytes, result.measured_kv_bytes)),
            ("KV cache tokens", f"{result.predicted_kv_tokens:,}",
             f"{result.measured_kv_tokens:,}",
             _same(result.predicted_kv_tokens, result.measured_kv_tokens)),
            ("parameters", f"{result.predicted_params:,}", f"{result.measured_params:,}",
             _same(result.predicted_params, result.measured_params))]
    rows.append(("", "floor", "measured", "measured/floor"))
    for step in (result.prefill, *result.decode):
        rows.append((step.label, f"{format_seconds(step.floor.seconds)} ({step.floor.bound})",
                     format_seconds(step.measured_s), f"{step.ratio:,.1f}×"))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        lines.append("  " + "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                                      for i, (cell, w) in enumerate(zip(row, widths))))
    lines += ["", "Floors: max(bytes read / bandwidth, FLOPs / peak) from the local numbers; "
                  "measured: median engine step time (LLMEngine.last_step.duration_s)."]
    tp = result.tensor_parallel
    if tp is not None:
        lines += ["", f"Tensor parallel on {tp.ranks} ranks (gloo): all-reduce latency {tp.latency_s * 1e6:,.0f} us, "
                      f"bandwidth {tp.bandwidth / 1e9:,.2f} GB/s (fitted to all-reduces of 1 and 64 rows)"]
        rows = [("", "predicted", "measured", "check"),
                ("parameters per rank", f"{tp.predicted_params_per_rank:,}",
                 " / ".join(f"{n:,}" for n in tp.measured_params_per_rank),
                 f"+{max(tp.measured_params_per_rank) - tp.predicted_params_per_rank:,} (replicated norms, vocab padding)"),
                ("KV cache bytes per rank", f"{tp.predicted_kv_bytes_per_rank:,}",
                 " / ".join(f"{n:,}" for n in tp.measured_kv_bytes_per_rank),
                 "equal" if set(tp.measured_kv_bytes_per_rank) == {tp.predicted_kv_bytes_per_rank} else "DIFFERS")]
        rows += [(f"all-reduce per decode step, batch {batch}", format_seconds(predicted), format_seconds(measured),
                  f"{measured / predicted:,.2f}×") for batch, predicted, measured in tp.comm]
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        for row in rows:
            lines.append("  " + "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                                          for i, (cell, w) in enumerate(zip(row, widths))))
        lines.append("  predicted: 2 all-reduces per layer of batch x hidden x dtype bytes (the estimator's term with the "
                     "fitted link); measured: rank 0's time inside all-reduces (the embedding's one included)")
    if not result.kv_matches:
        lines.append("! the engine's KV cache differs from the prediction")
    return "\n".join(lines)


def _same(predicted: int, measured: int) -> str:
    return "equal" if predicted == measured else f"DIFFERS by {measured - predicted:+,}"
