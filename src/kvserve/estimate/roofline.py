"""Memory, concurrency and roofline-latency formulas.

Each formula is a small function of plain numbers so tests can check it against
hand-computed values; :func:`estimate` combines them for one model on one
deployment. Conventions (see docs/ESTIMATE.md for the reasoning):

- Weights, FLOPs and KV cache are split evenly over ``num_devices`` (tensor
  parallelism); key/value heads are replicated when there are fewer of them than
  devices, as vLLM does.
- Decode reads every weight once per step plus the whole KV cache of the batch;
  a step costs ``max(memory term, compute term)`` plus the tensor-parallel
  all-reduces, which are assumed not to overlap with either.
- Matmul FLOPs are ``2·P`` per token (the write-ups' rule); attention adds
  ``4·layers·heads·head_dim`` per token of context.
- A layer with a sliding window W reads only ``min(context, W)`` keys per query;
  when every layer has one, a sequence holds only the blocks its window reaches
  (kvserve frees the rest), so concurrency counts ``min(seq_len, W + block − 1)``
  tokens per sequence, not ``seq_len``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from kvserve.estimate.hardware import Hardware
from kvserve.estimate.model_shape import ModelShape

DTYPE_BYTES: dict[str, int] = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "int8": 1}
COMPUTE_DTYPES = ("fp32", "bf16", "fp16")
WEIGHT_DTYPES = ("fp32", "bf16", "fp16", "int8")
KV_DTYPES = ("fp32", "bf16", "fp16", "fp8", "int8")
# An int8 / fp8 KV cache as kvserve stores it (--kv-cache-dtype, attention/kv_quant.py): one fp32 scale
# per token and kv head, for K and for V, besides the 1-byte values.
KV_SCALE_BYTES: dict[str, int] = {"fp8": 4, "int8": 4}
_ALIASES = {
    "float32": "fp32", "float": "fp32", "bfloat16": "bf16", "float16": "fp16",
    "half": "fp16", "float8": "fp8", "fp8_e4m3": "fp8", "fp8_e5m2": "fp8",
}


def normalize_dtype(name: str, parameter: str, allowed: tuple[str, ...]) -> str:
    """Canonical dtype name (``bfloat16`` → ``bf16``), or a ValueError naming ``parameter``."""
    canonical = _ALIASES.get(str(name).lower(), str(name).lower())
    if canonical not in allowed:
        raise ValueError(f"{parameter}: got {name!r}; allowed values are {', '.join(allowed)}")
    return canonical


def weight_bytes(num_params: int, weights_dtype: str) -> int:
    """Bytes of all weights; int8 counts every parameter (norms, embeddings) as 1 byte."""
    return num_params * DTYPE_BYTES[weights_dtype]


def kv_bytes_per_token(shape: ModelShape, kv_dtype: str) -> int:
    """``2 (K and V) · layers · kv_heads · (head_dim · bytes + scale bytes)``, the scale 4 bytes for int8 and
    fp8 (kvserve's per-token, per-head scales) and none otherwise.

    GQA and MQA shrink it by ``heads / kv_heads`` compared with MHA.
    """
    per_head = shape.head_dim * DTYPE_BYTES[kv_dtype] + KV_SCALE_BYTES.get(kv_dtype, 0)
    return 2 * shape.num_layers * shape.num_kv_heads * per_head


def kv_replication(num_kv_heads: int, num_devices: int) -> float:
    """How many copies of each KV head exist over the devices (>1 only when kv_heads < devices)."""
    return num_devices * math.ceil(num_kv_heads / num_devices) / num_kv_heads


def kv_cache_budget_bytes(device_memory_bytes: float, num_devices: int, memory_fraction: float,
                          weights: float, weight_overhead: float = 1.0) -> float:
    """Memory left for the KV cache: ``devices · memory · fraction − overhead · weights``.

    ``weight_overhead=1.2`` is the write-ups' "inference memory ≈ 1.2 · weights + KV"
    (the 20% standing for activations and framework buffers). Negative when the
    weights do not fit.
    """
    return num_devices * device_memory_bytes * memory_fraction - weight_overhead * weights


def kv_cache_tokens(budget_bytes: float, bytes_per_token: float, block_size: int = 1) -> int:
    """Tokens the cache holds: whole blocks of ``block_size`` tokens that fit in the budget."""
    if budget_bytes <= 0:
        return 0
    block_bytes = bytes_per_token * block_size
    if float(budget_bytes).is_integer() and float(block_bytes).is_integer():
        # Integer division, as the engine sizes its cache: exact for any budget.
        return int(budget_bytes) // int(block_bytes) * block_size
    return math.floor(budget_bytes / block_bytes) * block_size


def sequence_kv_tokens(seq_len: int, window: int | None, block_size: int = 1, sinks: int = 0) -> int:
    """KV cache tokens one sequence of ``seq_len`` tokens holds at its longest, in whole blocks.

    All of them without a sliding window. With a window W on every layer the engine frees the blocks
    behind the next query's window, so a sequence holds the W keys it reads (its own included), which
    straddle at most ``(W + block_size − 1) / block_size`` blocks; with S attention sinks it keeps the
    blocks of its first S tokens too: min(seq_len, S + W) tokens, in whole blocks. A prompt chunk in
    flight may hold up to a chunk more for one step; that is left out.
    """
    sink_tokens = math.ceil(sinks / block_size) * block_size
    held = seq_len if window is None else min(seq_len, sink_tokens + window + block_size - 1)
    return math.ceil(held / block_size) * block_size


def max_concurrent_sequences(cache_tokens: int, seq_len: int, block_size: int = 1) -> float:
    """Sequences of ``seq_len`` tokens (rounded up to whole blocks) that fit at once.

    Fractional on purpose: the write-ups quote e.g. "26.9 sequences"; the engine
    can run ``floor`` of it.
    """
    return cache_tokens / (math.ceil(seq_len / block_size) * block_size)


def allreduce_seconds(num_bytes: float, num_devices: int, link_bandwidth: float | None, latency: float = 0.0) -> float:
    """Ring all-reduce: each device sends and receives ``2(N−1)/N · bytes`` over its link, plus a fixed
    ``latency`` per call (what dominates small decode all-reduces; 0 where the hardware table has none)."""
    if num_devices == 1:
        return 0.0
    if not link_bandwidth:
        raise ValueError("num_devices: this hardware has no interconnect; use num_devices=1")
    return latency + 2 * (num_devices - 1) / num_devices * num_bytes / link_bandwidth


def tp_comm_seconds(shape: ModelShape, num_tokens: int, activation_bytes: int,
                    num_devices: int, link_bandwidth: float | None, latency: float = 0.0) -> float:
    """Megatron-style tensor parallelism: 2 all-reduces per layer (after attention and
    after the MLP) of the ``num_tokens × hidden`` activations."""
    per_allreduce = num_tokens * shape.hidden_size * activation_bytes
    return 2 * shape.num_layers * allreduce_seconds(per_allreduce, num_devices, link_bandwidth, latency)


def attention_flops_per_token(shape: ModelShape, context_len: float) -> float:
    """``Q·Kᵀ`` and ``softmax·V`` for one query token over ``context_len`` cached tokens."""
    return 4 * shape.num_layers * shape.q_size * context_len


@dataclass(frozen=True)
class StepFloor:
    """Lower bound on one step's time: ``max(memory, compute) + communication``."""

    memory_s: float
    compute_s: float
    comm_s: float

    @property
    def bound(self) -> str:
        return "memory" if self.memory_s >= self.compute_s else "compute"

    @property
    def seconds(self) -> float:
        return max(self.memory_s, self.compute_s) + self.comm_s

    def to_dict(self) -> dict:
        return {**asdict(self), "bound": self.bound, "seconds": self.seconds}


@dataclass(frozen=True)
class Deployment:
    """Per-device rates and sizes of ``num_devices`` devices running one model with TP."""

    hardware: Hardware
    num_devices: int
    compute_dtype: str

    @property
    def bandwidth(self) -> float:
        return self.hardware.memory_bandwidth

    @property
    def flops(self) -> float:
        return self.hardware.flops(self.compute_dtype)

    @property
    def link_bandwidth(self) -> float | None:
        return self.hardware.interconnect_bandwidth


def decode_step_floor(shape: ModelShape, deployment: Deployment, weights: float,
                      kv_per_token_per_device: float, batch: int, context_len: float) -> StepFloor:
    """One decode step of ``batch`` sequences with ``context_len`` cached tokens each."""
    n = deployment.num_devices
    memory = (weights / n + batch * context_len * kv_per_token_per_device) / deployment.bandwidth
    flops = batch * (2 * shape.num_params + attention_flops_per_token(shape, context_len))
    comm = tp_comm_seconds(shape, batch, DTYPE_BYTES[deployment.compute_dtype], n,
                           deployment.link_bandwidth)
    return StepFloor(memory, flops / (n * deployment.flops), comm)


def crossover_batch(shape: ModelShape, deployment: Deployment, weights: float,
                    kv_per_token_per_device: float, context_len: float) -> float:
    """Batch size where the decode compute term equals the memory term.

    Each extra sequence adds compute ``(2P + attention)/(N·F)`` but also KV reads
    ``context · kv_bytes / bandwidth``; when the KV reads grow faster, decode never
    turns compute-bound and the answer is ``inf``. With no context and 2-byte
    weights this is ``F / bandwidth``, the hardware's ops:byte ratio.
    """
    n = deployment.num_devices
    compute_per_seq = (2 * shape.num_params + attention_flops_per_token(shape, context_len)) / (
        n * deployment.flops)
    kv_per_seq = context_len * kv_per_token_per_device / deployment.bandwidth
    if compute_per_seq <= kv_per_seq:
        return math.inf
    return (weights / n / deployment.bandwidth) / (compute_per_seq - kv_per_seq)


def prefill_floor(shape: ModelShape, deployment: Deployment, weights: float,
                  kv_per_token_per_device: float, batch: int, prompt_len: int) -> StepFloor:
    """Prefill of ``batch`` prompts of ``prompt_len`` tokens in one step (causal attention)."""
    n = deployment.num_devices
    tokens = batch * prompt_len
    attention = 2 * shape.num_layers * shape.q_size * prompt_len * (prompt_len + 1)
    flops = tokens * 2 * shape.num_params + batch * attention
    memory = (weights / n + tokens * kv_per_token_per_device) / deployment.bandwidth
    comm = tp_comm_seconds(shape, tokens, DTYPE_BYTES[deployment.compute_dtype], n,
                           deployment.link_bandwidth)
    return StepFloor(memory, flops / (n * deployment.flops), comm)


@dataclass(frozen=True)
class EstimateParams:
    """What is asked: precisions, deployment size, lengths, batch and memory convention.

    ``dtype="auto"`` picks the fastest of bf16, fp16, fp32 on the hardware (bf16 on
    GPUs, fp16 on V100, often fp32 on CPUs without bf16 units). ``weights_dtype``
    and ``kv_dtype`` default to ``dtype``. ``device_memory_bytes`` and
    ``kv_bytes_per_token`` override the hardware table and the exact KV formula, to
    reproduce write-ups that use round numbers ("40 GB", "1 MB per token").
    ``kv_cache_memory_bytes`` is the KV cache's byte budget on each device, as the
    engine's ``EngineConfig.kv_cache_memory_bytes``: it replaces ``memory ·
    fraction − weights``, and the engine then allocates exactly the predicted
    ``kv_cache_tokens`` (``budget // (block_size · kv bytes per token)`` blocks).
    """

    dtype: str = "auto"
    weights_dtype: str | None = None
    kv_dtype: str | None = None
    num_devices: int = 1
    input_len: int = 512
    output_len: int = 512
    batch: int = 1
    memory_fraction: float = 0.9
    weight_overhead: float = 1.0
    block_size: int = 16
    kv_bytes_per_token: float | None = None
    device_memory_bytes: float | None = None
    kv_cache_memory_bytes: float | None = None
    sliding_window: int | None = None  # the engine's option: every layer's window, replacing the model's
    attention_sinks: int = 0  # the engine's option: tokens every layer keeps before its window

    def __post_init__(self) -> None:
        if self.sliding_window is not None:
            _check_int("sliding_window", self.sliding_window, 1)
        _check_int("attention_sinks", self.attention_sinks, 0)
        if self.attention_sinks and self.sliding_window is None:
            raise ValueError(f"attention_sinks: got {self.attention_sinks}; needs a sliding_window")
        _check_int("num_devices", self.num_devices, 1)
        _check_int("input_len", self.input_len, 1)
        _check_int("output_len", self.output_len, 0)
        _check_int("batch", self.batch, 1)
        _check_int("block_size", self.block_size, 1)
        if not 0 < self.memory_fraction <= 1:
            raise ValueError(f"memory_fraction: got {self.memory_fraction}; must be in (0, 1]")
        if self.weight_overhead < 1:
            raise ValueError(f"weight_overhead: got {self.weight_overhead}; must be >= 1")
        for name in ("kv_bytes_per_token", "device_memory_bytes", "kv_cache_memory_bytes"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name}: got {value}; must be > 0")
        if self.dtype != "auto":
            normalize_dtype(self.dtype, "dtype", COMPUTE_DTYPES)
        if self.weights_dtype is not None:
            normalize_dtype(self.weights_dtype, "weights_dtype", WEIGHT_DTYPES)
        if self.kv_dtype is not None:
            normalize_dtype(self.kv_dtype, "kv_dtype", KV_DTYPES)

    def resolved_dtypes(self, hardware: Hardware) -> tuple[str, str, str]:
        """``(compute, weights, kv)`` canonical dtype names for this hardware."""
        if self.dtype == "auto":
            # Ties (bf16 = fp16 on most GPUs) go to the earlier name in this tuple.
            preference = ("bf16", "fp16", "fp32")
            compute = max((d for d in preference if d in hardware.peak_flops),
                          key=lambda d: (hardware.peak_flops[d], -preference.index(d)))
        else:
            compute = normalize_dtype(self.dtype, "dtype", COMPUTE_DTYPES)
        if compute not in hardware.peak_flops:
            allowed = [d for d in COMPUTE_DTYPES if d in hardware.peak_flops]
            raise ValueError(f"dtype: {compute!r} has no peak FLOP/s on hardware "
                             f"{hardware.name!r}; allowed values are {', '.join(allowed)}")
        weights = normalize_dtype(self.weights_dtype or compute, "weights_dtype", WEIGHT_DTYPES)
        kv = normalize_dtype(self.kv_dtype or compute, "kv_dtype", KV_DTYPES)
        return compute, weights, kv


def _check_int(name: str, value: int, minimum: int) -> None:
    if not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: got {value!r}; must be an integer >= {minimum}")


@dataclass(frozen=True)
class Estimate:
    """Every number ``kvserve estimate`` prints. Bytes are bytes, times are seconds."""

    model: ModelShape
    hardware: Hardware
    params: EstimateParams
    compute_dtype: str
    weights_dtype: str
    kv_dtype: str
    num_params: int
    approx_num_params: int
    weight_bytes: int
    kv_bytes_per_token: float
    kv_bytes_per_token_per_device: float
    device_memory_bytes: float
    kv_cache_budget_bytes: float
    kv_cache_tokens: int
    seq_len: int
    sequence_kv_tokens: int  # KV cache tokens one sequence holds at its longest (whole blocks)
    max_concurrent_sequences: float
    decode_context_len: float
    decode_attended_len: float  # keys a decode query reads per layer (the context, or its sliding window)
    decode: StepFloor
    crossover_batch: float
    crossover_batch_weights_only: float
    prefill: StepFloor
    request_latency_s: float
    notes: list[str] = field(default_factory=list)

    @property
    def kv_cache_bytes(self) -> float:
        """Bytes the KV cache occupies over all devices: whole blocks, not the whole budget."""
        return self.kv_cache_tokens * self.kv_bytes_per_token_per_device * self.params.num_devices

    @property
    def max_num_seqs(self) -> int:
        return math.floor(self.max_concurrent_sequences)

    @property
    def weights_fit(self) -> bool:
        return self.kv_cache_budget_bytes > 0

    @property
    def batch_fits(self) -> bool:
        return self.params.batch <= self.max_concurrent_sequences

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens/s of the whole batch in steady-state decode."""
        return self.params.batch / self.decode.seconds

    @property
    def per_sequence_tokens_per_s(self) -> float:
        return 1 / self.decode.seconds

    @property
    def overall_tokens_per_s(self) -> float:
        """Generated tokens/s over a whole request, prefill included."""
        return self.params.batch * self.params.output_len / self.request_latency_s

    def to_dict(self) -> dict:
        """JSON-ready: infinite crossover batches (never compute-bound) become ``None``."""
        return {
            "model": {**asdict(self.model), "attention_kind": self.model.attention_kind},
            "hardware": self.hardware.to_dict(),
            "params": asdict(self.params),
            "compute_dtype": self.compute_dtype,
            "weights_dtype": self.weights_dtype,
            "kv_dtype": self.kv_dtype,
            "num_params": self.num_params,
            "approx_num_params": self.approx_num_params,
            "param_breakdown": self.model.param_breakdown(),
            "weight_bytes": self.weight_bytes,
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "kv_bytes_per_token_per_device": self.kv_bytes_per_token_per_device,
            "device_memory_bytes": self.device_memory_bytes,
            "kv_cache_budget_bytes": self.kv_cache_budget_bytes,
            "kv_cache_tokens": self.kv_cache_tokens,
            "kv_cache_bytes": self.kv_cache_bytes,
            "seq_len": self.seq_len,
            "sequence_kv_tokens": self.sequence_kv_tokens,
            "max_concurrent_sequences": self.max_concurrent_sequences,
            "max_num_seqs": self.max_num_seqs,
            "weights_fit": self.weights_fit,
            "batch_fits": self.batch_fits,
            "decode_context_len": self.decode_context_len,
            "decode_attended_len": self.decode_attended_len,
            "decode": self.decode.to_dict(),
            "crossover_batch": _finite_or_none(self.crossover_batch),
            "crossover_batch_weights_only": _finite_or_none(self.crossover_batch_weights_only),
            "prefill": self.prefill.to_dict(),
            "tp_comm_per_decode_step_s": self.decode.comm_s,
            "decode_tokens_per_s": self.decode_tokens_per_s,
            "per_sequence_tokens_per_s": self.per_sequence_tokens_per_s,
            "request_latency_s": self.request_latency_s,
            "overall_tokens_per_s": self.overall_tokens_per_s,
            "notes": list(self.notes),
        }


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def estimate(shape: ModelShape, hardware: Hardware, params: EstimateParams) -> Estimate:
    """All estimates for ``shape`` on ``params.num_devices`` × ``hardware``."""
    compute, weights_dtype, kv_dtype = params.resolved_dtypes(hardware)
    n = params.num_devices
    if n > 1 and not hardware.interconnect_bandwidth:
        raise ValueError(f"num_devices: got {n}, but hardware {hardware.name!r} has no "
                         "interconnect; allowed value is 1")
    deployment = Deployment(hardware, n, compute)
    weights = weight_bytes(shape.num_params, weights_dtype)
    kv_token = params.kv_bytes_per_token or kv_bytes_per_token(shape, kv_dtype)
    kv_device = kv_token * kv_replication(shape.num_kv_heads, n) / n
    memory = params.device_memory_bytes or hardware.memory_bytes
    if params.kv_cache_memory_bytes is not None:
        budget = n * params.kv_cache_memory_bytes
    else:
        budget = kv_cache_budget_bytes(memory, n, params.memory_fraction, weights,
                                       params.weight_overhead)
    # The budget is per deployment; each device holds its shard of every token.
    tokens = kv_cache_tokens(budget / n, kv_device, params.block_size)
    seq_len = params.input_len + params.output_len
    window = params.sliding_window or shape.kv_window
    held = sequence_kv_tokens(seq_len, window, params.block_size, params.attention_sinks)
    context = params.input_len + params.output_len / 2
    if params.sliding_window is None:
        attended = shape.attended_len(context)
    else:  # every layer reads its sinks and its window
        attended = min(context, params.attention_sinks + params.sliding_window)
    decode = decode_step_floor(shape, deployment, weights, kv_device, params.batch, attended)
    prefill = prefill_floor(shape, deployment, weights, kv_device, params.batch, params.input_len)
    latency = prefill.seconds + max(params.output_len - 1, 0) * decode.seconds
    notes = _notes(params, budget, tokens, seq_len, held)
    return Estimate(
        model=shape, hardware=hardware, params=params, compute_dtype=compute,
        weights_dtype=weights_dtype, kv_dtype=kv_dtype, num_params=shape.num_params,
        approx_num_params=shape.approx_num_params, weight_bytes=weights,
        kv_bytes_per_token=kv_token, kv_bytes_per_token_per_device=kv_device,
        device_memory_bytes=memory, kv_cache_budget_bytes=budget, kv_cache_tokens=tokens,
        seq_len=seq_len, sequence_kv_tokens=held,
        max_concurrent_sequences=max_concurrent_sequences(tokens, held, params.block_size),
        decode_context_len=context, decode_attended_len=attended, decode=decode,
        crossover_batch=crossover_batch(shape, deployment, weights, kv_device, attended),
        crossover_batch_weights_only=crossover_batch(shape, deployment, weights, kv_device, 0),
        prefill=prefill, request_latency_s=latency, notes=notes,
    )


def _notes(params: EstimateParams, budget: float, tokens: int, seq_len: int, held: int) -> list[str]:
    notes = []
    if budget <= 0:
        notes.append("the weights do not fit in the memory given: no room for a KV cache")
    elif params.batch * held > tokens:
        notes.append(f"batch {params.batch} × {held} tokens does not fit in the KV cache "
                     f"({tokens} tokens): the engine would run fewer sequences at once")
    return notes
