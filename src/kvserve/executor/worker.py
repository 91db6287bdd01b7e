"""Worker: one rank's model, KV cache and ModelRunner.

It loads the weights (its shard, under tensor or pipeline parallelism), says how
much memory is left for the KV cache, allocates the cache once the engine has
sized it, and runs steps. The engine reaches it only through an `Executor`.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import torch

from kvserve import startup
from kvserve.config import EngineConfig
from kvserve.distributed.communication import COMM
from kvserve.distributed.parallel_state import SINGLE, ParallelContext
from kvserve.engine.model_runner import ModelRunner
from kvserve.engine.runner_output import ModelRunnerOutput
from kvserve.engine.scheduler_output import SchedulerOutput
from kvserve.executor.abstract import WorkerInfo
from kvserve.executor.thread_governor import ThreadGovernor
from kvserve.models.loader import load_model
from kvserve.spec_decode.draft_runner import draft_model_config

_DEFAULT_CPU_KV_BYTES = 4 << 30
_CPU_KV_SHARE = 0.3  # of the memory available, by default
_CUDA_KV_SHARE = 0.8  # of the device memory free after loading the weights


def available_memory_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def kv_share_of_memory(utilization: float | None, free: int, total: int, on_cuda: bool) -> int:
    """KV cache bytes for `gpu_memory_utilization` (None: the default share), after the weights are loaded.

    On CUDA it means what it means in vLLM: weights plus KV cache fill that fraction of the device's `total`
    memory, so the cache gets `utilization x total` less what is already used (`total - free`: the weights, and
    any other process on the device). The default keeps 20% of the free memory back for activations instead.
    On CPU there is no device to fill: the fraction is of the `free` (available) RAM, and takes the place of the
    default share of 30% capped at 4 GiB.
    """
    if utilization is None:
        return int(free * _CUDA_KV_SHARE) if on_cuda else min(_DEFAULT_CPU_KV_BYTES, int(free * _CPU_KV_SHARE))
    if not on_cuda:
        return int(free * utilization)
    budget = int(total * utilization) - (total - free)
    if budget <= 0:
        raise ValueError(
            f"gpu_memory_utilization={utilization} leaves no room for the KV cache: {(total - free) / 2**30:.2f} GiB "
            f"of the device's {total / 2**30:.2f} GiB are already in use (weights included); raise it, up to 1"
        )
    return budget


class Worker:
    def __init__(
        self, config: EngineConfig, hf_config: Any, model_path: str, eos_token_ids: set[int], parallel: ParallelContext = SINGLE,
        ranks_on_this_machine: int = 1,
    ) -> None:
        self.config = config
        self.hf_config = hf_config
        self.eos_token_ids = eos_token_ids
        self.parallel = parallel
        self.ranks_on_this_machine = ranks_on_this_machine
        torch.set_num_threads(config.num_threads)
        on_cpu = config.device == "cpu"
        self.governor = ThreadGovernor(config.num_threads) if on_cpu and config.adaptive_threads else None
        self.model = load_model(
            model_path, hf_config, config.torch_dtype, config.device, config.load_format, config.max_model_len,
            config.attention_backend, config.linear_backend, config.quantization, config.quantization_group_size,
            config.kv_cache_dtype, parallel, config.streaming_window,
        )
        self.draft = draft_model_config(config.speculative_config)
        self.draft_model = None
        if self.draft is not None:  # speculative decoding with a draft model: loaded as the target is
            path, draft_hf_config = self.draft
            with startup.phase("loading the draft model"):
                self.draft_model = load_model(
                    path, draft_hf_config, config.torch_dtype, config.device, config.load_format, config.max_model_len,
                    config.attention_backend, config.linear_backend,
                    config.speculative_config.quantization or config.quantization, config.quantization_group_size,
                    config.kv_cache_dtype, SINGLE, config.streaming_window,
                )
        self.runner: ModelRunner | None = None
        self.busy_seconds = 0.0

    def available_kv_cache_memory(self) -> int:
        """Bytes this rank's KV cache may take: `kv_cache_memory_bytes` (per rank) when set, else what
        `gpu_memory_utilization` leaves (see `kv_share_of_memory`), else the default share of the memory."""
        config = self.config
        if config.kv_cache_memory_bytes is not None:
            return config.kv_cache_memory_bytes
        if config.device.startswith("cuda"):
            free, total = torch.cuda.mem_get_info()
            return kv_share_of_memory(config.gpu_memory_utilization, free, total, on_cuda=True)
        return kv_share_of_memory(config.gpu_memory_utilization, available_memory_bytes(), 0,
                                  on_cuda=False) // self.ranks_on_this_machine

    def initialize_cache(self, num_blocks: int) -> None:
        config = self.config
        self.runner = ModelRunner(
            self.model, self.hf_config, num_blocks, config.block_size, config.torch_dtype, config.device, config.seed,
            self.eos_token_ids, config.kv_cache_dtype, self.parallel, self.draft_model,
            None if self.draft is None else self.draft[1],
        )

    def execute_model(self, output: SchedulerOutput) -> ModelRunnerOutput:
        assert self.runner is not None, "initialize_cache() first"
        governor = self.governor
        started = time.perf_counter()
        if governor is None or output.probe:
            result = self.runner.execute(output)
        else:
            num_tokens = output.total_num_scheduled_tokens
            governor.before_step(num_tokens)
            result = self.runner.execute(output)
            governor.after_step(num_tokens, time.perf_counter() - started)
        self.busy_seconds += time.perf_counter() - started
        return result

    def info(self) -> WorkerInfo:
        kv_bytes, sequences = 0, 0
        if self.runner is not None:
            drafter = self.runner.drafter
            kv_bytes = sum(cache.nbytes for cache in self.runner.kv_caches + (drafter.kv_caches if drafter else []))
            sequences = len(self.runner.state.seqs)
        return WorkerInfo(sum(p.numel() for p in self.model.parameters()), kv_bytes, getattr(self.model, "kernel_plan", None),
                          sequences, copy.deepcopy(COMM), self.busy_seconds, self._weight_bytes())

    def _weight_bytes(self) -> int:
        models = [self.model] + ([self.draft_model] if self.draft_model is not None else [])
        packed = sum(m.quantized.nbytes for model in models for m in model.modules() if getattr(m, "quantized", None) is not None)
        return packed + sum(p.nbytes for model in models for p in model.parameters())
