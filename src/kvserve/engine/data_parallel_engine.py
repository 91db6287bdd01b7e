"""DataParallelEngine: N whole-model engine replicas behind the one interface `LLM` and the server use.

Each replica is an `LLMEngine` — its own scheduler, block pool and prefix cache in this process —
whose ranks (one, or a tensor/pipeline-parallel group) run in spawned worker processes, on their
share of the machine's cores (executor/cpu_share.py). A step starts every replica's step
(`start_step`: schedule, broadcast to its workers) before finishing any (`finish_step`), so the
replicas compute at the same time while this process only schedules.

A new request goes where `PrefixRouter` says: the replica that was sent its prefix before, else
the least loaded (fewest unfinished requests). `stats()` sums the replicas' pools and queues and
keeps each replica's own snapshot in `replicas` (the server labels metrics per replica with it).
"""

from __future__ import annotations

import time
from dataclasses import replace

from kvserve.config import EngineConfig
from kvserve.engine.llm_engine import LLMEngine, StepStats
from kvserve.engine.prefix_router import PrefixRouter
from kvserve.engine.scheduler import SchedulerStats
from kvserve.engine.scheduler_output import SchedulerOutput
from kvserve.engine.snapshot import EngineSnapshot
from kvserve.executor.abstract import WorkerInfo
from kvserve.outputs import RequestOutput
from kvserve.sampling_params import BeamSearchParams, SamplingParams
from kvserve.validation import brief


class DataParallelEngine:
    def __init__(self, replicas: list[LLMEngine]) -> None:
        self.replicas = replicas
        first = self.replicas[0]
        self.config, self.hf_config, self.model_path = first.config, first.hf_config, first.model_path
        self.tokenizer, self.eos_token_ids, self.worker_info = first.tokenizer, first.eos_token_ids, first.worker_info
        self.grammar_compiler = first.grammar_compiler  # one compile cache for all replicas (same tokenizer)
        for replica in self.replicas[1:]:
            replica.grammar_compiler = self.grammar_compiler
        self.sampling_defaults = first.sampling_defaults
        self.max_seq_len = min(r.max_seq_len for r in self.replicas)
        self.router = PrefixRouter(len(self.replicas), self.config.block_size)
        self.replica_of: dict[str, int] = {}  # request id -> replica, while it runs
        self.last_step = StepStats()
        self.total_steps = 0

    def encode(self, prompt: str) -> list[int]:
        return self.replicas[0].encode(prompt)

    def kv_bytes_per_token(self) -> int:
        return self.replicas[0].kv_bytes_per_token()

    def add_request(
        self, request_id: str, prompt: str | list[int] | None, params: SamplingParams | BeamSearchParams | None = None,
        prompt_token_ids: list[int] | None = None,
    ) -> None:
        """Route the request (by its token ids) and queue it there; ValueError for bad input, as `LLMEngine`."""
        if request_id in self.replica_of:
            raise ValueError(f"request_id {brief(request_id)} is already in use")
        text, ids = self.replicas[0].prompt_text_and_ids(prompt, prompt_token_ids)  # encoded once, for the router too
        replica = self.router.route(ids if isinstance(ids, list) else [], [r.get_num_unfinished_requests() for r in self.replicas])
        self.replicas[replica].add_request(request_id, text, params, ids)
        self.replica_of[request_id] = replica

    def abort_request(self, request_id: str) -> None:
        replica = self.replica_of.pop(request_id, None)
        if replica is not None:
            self.replicas[replica].abort_request(request_id)

    def has_unfinished_requests(self) -> bool:
        return any(r.has_unfinished_requests() for r in self.replicas)

    def get_num_unfinished_requests(self) -> int:
        return sum(r.get_num_unfinished_requests() for r in self.replicas)

    def unfinished_request_ids(self) -> list[str]:
        return [rid for r in self.replicas for rid in r.unfinished_request_ids()]

    def step(self) -> list[RequestOutput]:
        """One step of every replica, computed at the same time."""
        started = time.perf_counter()
        pending = [replica.start_step() for replica in self.replicas]
        outputs = [out for replica, output in zip(self.replicas, pending) for out in replica.finish_step(output)]
        for out in outputs:
            if out.finished:
                self.replica_of.pop(out.request_id, None)
        steps = [r.last_step for r in self.replicas]
        self.last_step = StepStats(
            sum(s.num_seqs for s in steps), sum(s.num_tokens for s in steps), sum(s.num_prefill_tokens for s in steps),
            sum(s.num_preempted for s in steps), time.perf_counter() - started,
            sum(s.num_context_tokens for s in steps), sum(s.num_attention_pairs for s in steps),
        )
        self.total_steps += any(p is not None for p in pending)
        return outputs

    def stats(self) -> SchedulerStats:
        """The replicas' pools and queues summed; each replica's own snapshot in `replicas`."""
        each = [r.stats() for r in self.replicas]
        blocks = sum(s.num_blocks for s in each)
        return SchedulerStats(
            num_running=sum(s.num_running for s in each), num_waiting=sum(s.num_waiting for s in each),
            num_preemptions=sum(s.num_preemptions for s in each), num_blocks=blocks, block_size=each[0].block_size,
            num_free_blocks=sum(s.num_free_blocks for s in each),
            num_cached_free_blocks=sum(s.num_cached_free_blocks for s in each),
            kv_cache_usage=sum(s.kv_cache_usage * s.num_blocks for s in each) / blocks,
            prefix_cache_queries=sum(s.prefix_cache_queries for s in each),
            prefix_cache_hits=sum(s.prefix_cache_hits for s in each),
            running=[seq for s in each for seq in s.running], replicas=each,
            spec_decode=None if each[0].spec_decode is None else sum((s.spec_decode for s in each[1:]), each[0].spec_decode),
        )

    def snapshot(self) -> EngineSnapshot:
        """Each replica's pool, in replica order."""
        return EngineSnapshot([pool for r in self.replicas for pool in r.snapshot().pools])

    def rank_infos(self) -> list[WorkerInfo]:
        """Every rank of every replica (a pipeline's virtual engines share theirs: listed once)."""
        executors = {id(r.executor): r for r in self.replicas}
        return [info for replica in executors.values() for info in replica.rank_infos()]

    def shutdown(self) -> None:
        for replica in self.replicas:
            replica.shutdown()


class PipelineEngine(DataParallelEngine):
    """A pipeline's virtual engines: N schedulers, each with 1/N of the KV blocks, over one executor.

    With one batch in flight, pipeline stage s waits while the others compute: each stage is busy
    1/N of the time (the bubble is (N-1)/N). With N virtual engines, N batches are in flight: each
    `step()` finishes the oldest batch and at once schedules and sends that engine's next one, so
    while the last stage finishes batch k, the first already computes batch k+1 (the workers take
    the commands in order; a stage sends its hidden states on as soon as it has them). An abort
    of a request whose batch is in flight waits until that batch is back.
    """

    def __init__(self, replicas: list[LLMEngine]) -> None:
        super().__init__(replicas)
        self._in_flight: list[SchedulerOutput | None] = [None] * len(replicas)
        self._next = 0
        self._aborts: list[list[str]] = [[] for _ in replicas]

    def abort_request(self, request_id: str) -> None:
        replica = self.replica_of.get(request_id)
        if replica is not None and self._in_flight[replica] is not None:
            self._aborts[replica].append(request_id)
            return
        super().abort_request(request_id)

    def has_unfinished_requests(self) -> bool:
        return super().has_unfinished_requests() or any(p is not None for p in self._in_flight)

    def step(self) -> list[RequestOutput]:
        """Finish the oldest batch in flight and send that virtual engine's next one; a round of N calls gives every
        engine one step."""
        started = time.perf_counter()
        i = self._next
        self._next = (i + 1) % len(self.replicas)
        replica = self.replicas[i]
        outputs = replica.finish_step(self._in_flight[i])
        self._in_flight[i] = None
        for request_id in self._aborts[i]:
            super().abort_request(request_id)
        self._aborts[i].clear()
        self._in_flight[i] = replica.start_step()
        for out in outputs:
            if out.finished:
                self.replica_of.pop(out.request_id, None)
        self.last_step = replace(replica.last_step, duration_s=time.perf_counter() - started)
        self.total_steps += 1
        return outputs


def make_engine(config: EngineConfig) -> LLMEngine | DataParallelEngine:
    """An `LLMEngine`; a `DataParallelEngine` of `config.data_parallel_size` replicas, each on its own spawned ranks;
    or, for a pipeline of N stages on spawned ranks, a `PipelineEngine` of N virtual engines sharing its ranks."""
    backend = config.distributed_executor_backend if config.distributed_executor_backend != "uni" else None
    if config.data_parallel_size > 1:
        return DataParallelEngine([
            LLMEngine(replace(config, data_parallel_rank=rank, distributed_executor_backend=backend or "mp"))
            for rank in range(config.data_parallel_size)
        ])
    stages = config.pipeline_parallel_size
    if stages > 1 and config.executor_backend == "mp" and config.pipeline_micro_batching:
        lead = LLMEngine(config, block_share=(0, stages))
        return PipelineEngine([lead, *(LLMEngine(replace(config), lead.executor, (i, stages)) for i in range(1, stages))])
    return LLMEngine(config)
