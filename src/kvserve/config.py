"""EngineConfig: every engine knob in one validated dataclass.

Model-derived values (context length, dtype, KV shape) are resolved once by
`EngineConfig.resolve()` after the HF config is known, so the rest of the engine
reads plain numbers and never re-derives them.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import torch

from kvserve.attention.attention_sinks import StreamingWindow
from kvserve.attention.kv_quant import check_kv_cache_dtype
from kvserve.spec_decode.config import SpeculativeConfig
from kvserve.validation import check, is_int, is_number

logger = logging.getLogger("kvserve")

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return frozenset()
    return frozenset(line.partition(":")[2].split())


def available_cores() -> int:
    """The CPUs this process may run on (its affinity mask: a container's or taskset's limit, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 matrix instructions (AVX-512 BF16 or AMX)."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def resolve_dtype(dtype: str | torch.dtype, config_dtype: torch.dtype | None, device: str) -> torch.dtype:
    """Turn the user's `dtype` into a torch dtype (see `dtype_choice`)."""
    return dtype_choice(dtype, config_dtype, device)[0]


def dtype_choice(dtype: str | torch.dtype, config_dtype: torch.dtype | None, device: str) -> tuple[torch.dtype, str]:
    """The torch dtype for the user's `dtype`, and why (for the log).

    "auto" follows the checkpoint like vLLM does, except on CPU: on a CPU with native bf16
    dot products (AVX-512 BF16, AMX) everything runs in bfloat16: half the bytes of dense
    weights and KV per decode step, at full matmul speed there. Without them a float32
    checkpoint (and a GGUF, whose quantized weights the kernels read whatever the dtype)
    runs in float32, where bf16 products would be emulated; a bfloat16 or float16 checkpoint
    runs in bfloat16 (CPU float16 matmuls are slow and overflow-prone, and widening bf16
    weights costs less than reading twice the bytes as float32).
    """
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
        return dtype, "as asked"
    key = str(dtype).lower()
    if key not in _DTYPES and key != "auto":
        raise ValueError(f"dtype must be one of auto, float32, bfloat16, float16, got {dtype!r}")
    if key != "auto":
        return _DTYPES[key], "as asked"
    chosen = config_dtype if config_dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.float32
    if device != "cpu":
        return chosen, "the checkpoint's dtype"
    if cpu_supports_bf16():
        return torch.bfloat16, "dtype=auto: this CPU has bf16 dot products (AVX-512 BF16 or AMX)"
    if chosen == torch.float32:
        return chosen, "dtype=auto: no bf16 dot products on this CPU, and the checkpoint is not 16-bit"
    return torch.bfloat16, f"dtype=auto: a {str(chosen).removeprefix('torch.')} checkpoint; no bf16 dot products on this CPU, " \
        "but widening bf16 weights costs less than reading float32"


@dataclass
class EngineConfig:
    """All engine settings. Names follow vLLM where vLLM has one."""

    model: str | None = None
    tokenizer: str | None = None
    dtype: str | torch.dtype = "auto"
    device: str = "auto"
    load_format: str = "auto"
    seed: int = 0
    revision: str | None = None
    max_model_len: int | None = None
    block_size: int = 16
    kv_cache_dtype: str = "auto"  # auto: the model's dtype; int8 | fp8_e4m3: quantized per token and kv head (attention/kv_quant.py)
    kv_cache_memory_bytes: int | None = None
    num_gpu_blocks_override: int | None = None
    enable_prefix_caching: bool = True
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    enable_chunked_prefill: bool = True
    attention_backend: str = "auto"
    linear_backend: str = "auto"
    quantization: str = "auto"  # auto: a GGUF's weights stay in the block formats the CPU kernels read; none: dequantize;
    # int8 / int4: quantize the decoder's linear layers at load (layers/weight_quantizer.py)
    quantization_group_size: int = 32  # int4's group of weights sharing a scale and zero: 32, 64 or 128
    num_threads: int | None = None  # CPU threads; None: the cores this process may run on
    adaptive_threads: bool = True  # use fewer when steps measure faster with fewer (executor/thread_governor.py)
    tensor_parallel_size: int = 1  # ranks splitting every layer (heads, MLP columns, vocabulary)
    pipeline_parallel_size: int = 1  # ranks holding consecutive layers
    pp_layer_partition: list[int] | None = None  # layers per pipeline stage; None: as even as possible
    pipeline_micro_batching: bool = True  # one batch in flight per stage (virtual engines), not one for the whole pipeline
    distributed_executor_backend: str | None = None  # None: "uni" for one rank, else "mp"; or "external_launcher" (torchrun)
    data_parallel_size: int = 1  # engine replicas, each a whole model on its own ranks (engine/data_parallel_engine.py)
    data_parallel_rank: int = 0  # which replica this engine is (set by the data-parallel engine)
    # StreamingLLM (attention/attention_sinks.py): every layer attends to the first `attention_sinks` tokens and
    # the last `sliding_window`, at positions within that cache; a request may then grow past max_model_len
    sliding_window: int | None = None
    attention_sinks: int = 0
    # vLLM's memory knob: on CUDA the fraction of the device's memory that weights plus KV cache may fill; on CPU the
    # fraction of the available RAM the KV cache takes (default: 30%, at most 4 GiB). kv_cache_memory_bytes wins.
    gpu_memory_utilization: float | None = None
    # Accepted for vLLM's sake: kvserve runs only its own model code, so a model that needs its own (config.json's
    # auto_map naming a class transformers lacks) is refused whatever this says (models/loader.py load_hf_config).
    trust_remote_code: bool = False
    # Accepted for vLLM's sake: kvserve always runs eagerly (no CUDA graphs, no torch.compile), so there is
    # nothing to turn off.
    enforce_eager: bool = False
    # No tokenizer loaded (a model directory without tokenizer files): prompts must be token ids, outputs carry
    # token ids and empty text, and stop strings cannot be matched.
    skip_tokenizer_init: bool = False
    # Speculative decoding (spec_decode/): vLLM's dict or JSON text, e.g. {"method": "ngram", "num_speculative_tokens": 5};
    # parsed into a SpeculativeConfig
    speculative_config: SpeculativeConfig | dict[str, Any] | str | None = None
    # vLLM's --chat-template: a chat template, or the path of a file holding one, in place of the tokenizer's
    chat_template: str | None = None
    # vLLM's --generation-config: "auto" takes the default temperature, top_p, top_k, min_p, repetition_penalty and
    # max_new_tokens (as max_tokens) from the model's generation_config.json, "vllm" ignores it, a folder reads
    # that folder's generation_config.json (generation_config.py)
    generation_config: str = "auto"

    # resolved by resolve(); not user settings
    hf_config: Any = field(default=None, repr=False)
    torch_dtype: torch.dtype | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        check(isinstance(self.block_size, int) and 1 <= self.block_size <= 1024, "block_size", self.block_size, "an integer in [1, 1024]")
        check(isinstance(self.max_num_seqs, int) and self.max_num_seqs >= 1, "max_num_seqs", self.max_num_seqs, "an integer >= 1")
        check(
            isinstance(self.max_num_batched_tokens, int) and self.max_num_batched_tokens >= 1,
            "max_num_batched_tokens",
            self.max_num_batched_tokens,
            "an integer >= 1",
        )
        check(self.load_format in ("auto", "safetensors", "pt", "gguf", "dummy"), "load_format", self.load_format, "one of auto, safetensors, pt, gguf, dummy")
        check(
            self.kv_cache_memory_bytes is None or (isinstance(self.kv_cache_memory_bytes, int) and self.kv_cache_memory_bytes > 0),
            "kv_cache_memory_bytes",
            self.kv_cache_memory_bytes,
            "a positive integer or None",
        )
        check(
            self.num_gpu_blocks_override is None or (isinstance(self.num_gpu_blocks_override, int) and self.num_gpu_blocks_override >= 1),
            "num_gpu_blocks_override",
            self.num_gpu_blocks_override,
            "an integer >= 1 or None",
        )
        check(self.max_model_len is None or (isinstance(self.max_model_len, int) and self.max_model_len >= 1), "max_model_len", self.max_model_len, "an integer >= 1 or None")
        check(self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"), "device", self.device, "auto, cpu or cuda[:N]")
        check(self.attention_backend in ("auto", "reference", "cpu", "triton"), "attention_backend", self.attention_backend, "one of auto, reference, cpu, triton")
        check(self.linear_backend in ("auto", "torch", "cpu"), "linear_backend", self.linear_backend, "one of auto, torch, cpu")
        check(self.quantization in ("auto", "none", "int8", "int4"), "quantization", self.quantization, "one of auto, none, int8, int4")
        check(self.quantization_group_size in (32, 64, 128), "quantization_group_size", self.quantization_group_size, "one of 32, 64, 128")
        check_kv_cache_dtype(self.kv_cache_dtype)
        check(self.gpu_memory_utilization is None or (is_number(self.gpu_memory_utilization)
                                                      and 0 < self.gpu_memory_utilization <= 1),
              "gpu_memory_utilization", self.gpu_memory_utilization, "a number in (0, 1] or None")
        check(self.chat_template is None or (isinstance(self.chat_template, str) and self.chat_template.strip() != ""),
              "chat_template", self.chat_template, "a chat template or the path of a file holding one, or None")
        check(isinstance(self.generation_config, str) and self.generation_config != "", "generation_config",
              self.generation_config, "auto, vllm or a folder holding a generation_config.json")
        for name in ("trust_remote_code", "enforce_eager", "skip_tokenizer_init"):
            check(isinstance(getattr(self, name), bool), name, getattr(self, name), "True or False")
        if self.enforce_eager:
            logger.info("enforce_eager: nothing to do, kvserve always runs eagerly (no CUDA graphs, no torch.compile)")
        if self.trust_remote_code:
            logger.info("trust_remote_code: kvserve never runs a model's own code; a model it has built in runs as usual")
        check(self.sliding_window is None or (is_int(self.sliding_window) and self.sliding_window >= 1), "sliding_window",
              self.sliding_window, "an integer >= 1 or None")
        check(is_int(self.attention_sinks) and self.attention_sinks >= 0, "attention_sinks", self.attention_sinks,
              "an integer >= 0")
        if self.attention_sinks and self.sliding_window is None:
            raise ValueError(f"attention_sinks={self.attention_sinks} needs a sliding_window: the sinks are kept "
                             "beside a window of recent tokens (set sliding_window, e.g. 1024)")
        if self.num_threads is None:
            self.num_threads = available_cores()
        check(is_int(self.num_threads) and self.num_threads >= 1, "num_threads", self.num_threads, "an integer >= 1 or None")
        check(isinstance(self.adaptive_threads, bool), "adaptive_threads", self.adaptive_threads, "True or False")
        for name in ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size"):
            value = getattr(self, name)
            check(is_int(value) and 1 <= value <= 1024, name, value, "an integer in [1, 1024]")
        check(
            self.pp_layer_partition is None or (isinstance(self.pp_layer_partition, (list, tuple))
                                                and all(is_int(n) and n >= 1 for n in self.pp_layer_partition)),
            "pp_layer_partition", self.pp_layer_partition, "a list of positive layer counts, one per pipeline stage, or None",
        )
        check(isinstance(self.pipeline_micro_batching, bool), "pipeline_micro_batching", self.pipeline_micro_batching, "True or False")
        check(self.distributed_executor_backend in (None, "uni", "mp", "external_launcher"), "distributed_executor_backend",
              self.distributed_executor_backend, "one of uni, mp, external_launcher (or None: uni for one rank, else mp)")
        check(is_int(self.data_parallel_rank) and 0 <= self.data_parallel_rank < self.data_parallel_size, "data_parallel_rank",
              self.data_parallel_rank, f"an integer in [0, {self.data_parallel_size - 1}]")
        if self.data_parallel_size > 1 and self.distributed_executor_backend == "external_launcher":
            raise ValueError("data_parallel_size > 1 runs its replicas' ranks as spawned processes: use "
                             "distributed_executor_backend mp (or leave it unset)")
        if self.distributed_executor_backend == "uni" and self.world_size > 1:
            raise ValueError(f"distributed_executor_backend 'uni' runs one rank, but tensor_parallel_size x "
                             f"pipeline_parallel_size is {self.world_size}; use mp or external_launcher")
        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        resolve_dtype(self.dtype, None, self.device)  # validates the name early
        self.speculative_config = SpeculativeConfig.parse(self.speculative_config)
        if self.speculative_config is not None and self.speculative_config.model is not None and self.world_size > 1:
            raise ValueError(f"speculative_config.model (a draft model) runs on one rank, but tensor_parallel_size x "
                             f"pipeline_parallel_size is {self.world_size}; use method ngram, or one rank")
        if self.speculative_config is not None and self.speculative_config.model is not None and self.sliding_window is not None:
            raise ValueError("speculative_config.model (a draft model) does not run with attention sinks and a streaming "
                             "window (sliding_window); use method ngram")

    @property
    def world_size(self) -> int:
        """Ranks one model runs on: tensor_parallel_size x pipeline_parallel_size."""
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def streaming_window(self) -> StreamingWindow | None:
        """The sink + window cache requests stream through (and may grow past max_model_len in), if set."""
        return None if self.sliding_window is None else StreamingWindow(self.attention_sinks, self.sliding_window)

    def rank_layout(self) -> list[Any]:
        """Every rank's `ParallelContext` (its stage's layers, its tp slot), by global rank; after `resolve()`."""
        from kvserve.distributed.parallel_state import rank_layout

        layers = getattr(self.hf_config, "num_hidden_layers", None) or self.hf_config.n_layer
        return rank_layout(layers, self.tensor_parallel_size, self.pipeline_parallel_size, self.pp_layer_partition)

    @property
    def executor_backend(self) -> str:
        return self.distributed_executor_backend or ("uni" if self.world_size == 1 else "mp")

    def resolve(self, hf_config: Any) -> None:
        """Fill the model-derived fields from the Hugging Face config."""
        self.hf_config = hf_config
        # `dtype` (transformers >= 4.56); reading `torch_dtype` on a v5 config logs a deprecation line on every start
        config_dtype = getattr(hf_config, "dtype", None) or vars(hf_config).get("torch_dtype")
        if isinstance(config_dtype, str):
            config_dtype = _DTYPES.get(config_dtype)
        self.torch_dtype, why = dtype_choice(self.dtype, config_dtype, self.device)
        logger.info("activations in %s (%s)", str(self.torch_dtype).removeprefix("torch."), why)
        model_len = model_context_length(hf_config)
        if self.max_model_len is None:
            self.max_model_len = model_len
        elif self.max_model_len > model_len and not os.environ.get("KVSERVE_ALLOW_LONG_MAX_MODEL_LEN"):
            raise ValueError(
                f"max_model_len must be <= the model's context length {model_len}, got {self.max_model_len} "
                "(set KVSERVE_ALLOW_LONG_MAX_MODEL_LEN=1 to override)"
            )
        check_parallel_shapes(hf_config, self.tensor_parallel_size, self.pipeline_parallel_size, self.pp_layer_partition)
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_model_len "
                f"({self.max_model_len}) when chunked prefill is off, or no long prompt could ever run"
            )


def check_parallel_shapes(hf_config: Any, tp_size: int, pp_size: int, partition: list[int] | None) -> None:
    """Refuse, before any process starts, a split the model's shapes do not allow (the error names the count)."""
    from kvserve.distributed.parallel_state import kv_heads_per_rank, partition_layers

    heads = getattr(hf_config, "num_attention_heads", None) or hf_config.n_head
    kv_heads_per_rank(heads, getattr(hf_config, "num_key_value_heads", None) or heads, tp_size)
    hidden = getattr(hf_config, "hidden_size", None) or hf_config.n_embd
    inner = getattr(hf_config, "intermediate_size", None) or getattr(hf_config, "n_inner", None) or 4 * hidden
    if inner % tp_size:
        raise ValueError(f"the MLP size ({inner}) must be divisible by tensor_parallel_size ({tp_size})")
    partition_layers(getattr(hf_config, "num_hidden_layers", None) or hf_config.n_layer, pp_size, partition)


def model_context_length(hf_config: Any) -> int:
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(hf_config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048
