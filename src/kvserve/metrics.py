"""Prometheus metrics of a running server, named as vLLM names them (prefix `kvserve:`).

Dashboards built for vLLM map one-to-one: `vllm:num_requests_running` is
`kvserve:num_requests_running`, and so on. Every server owns its own
`CollectorRegistry`, so several servers can live in one process (tests) without
clashing in prometheus-client's global registry.

The engine thread hands `ServerMetrics.observe` one `IterationStats` per iteration;
this module only translates those snapshots into Prometheus types. With data-parallel
replicas the metrics above are their sums, and `replica_*` gauges carry each replica's
own queues and KV usage, labelled `replica="0"`, `"1"`, ...
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from kvserve.engine.async_engine import IterationStats
from kvserve.spec_decode.speculator import SpecDecodeStats

PREFIX = "kvserve:"

# Bucket edges as in vLLM.
_TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
_ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0]
_E2E_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0]
_ITERATION_TOKEN_BUCKETS = [1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]

FINISH_REASONS = ("stop", "length", "abort", "error")


class ServerMetrics:
    """All metrics of one server, labelled with its served model name."""

    def __init__(self, model_name: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        m = ["model_name"]

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(PREFIX + name, doc, m, registry=r).labels(model_name)

        def counter(name: str, doc: str) -> Counter:
            return Counter(PREFIX + name, doc, m, registry=r).labels(model_name)

        def histogram(name: str, doc: str, buckets: list[float]) -> Histogram:
            return Histogram(PREFIX + name, doc, m, buckets=buckets, registry=r).labels(model_name)

        self.num_requests_running = gauge("num_requests_running", "Number of requests in the running batch.")
        self.num_requests_waiting = gauge("num_requests_waiting", "Number of requests waiting to be scheduled.")
        self.kv_cache_usage_perc = gauge("kv_cache_usage_perc", "Fraction of KV-cache blocks held by live requests (1 = full).")
        self.kv_cache_free_blocks = gauge("kv_cache_free_blocks", "KV-cache blocks not held by any live request.")
        self.num_preemptions = counter("num_preemptions_total", "Cumulative number of preemptions.")
        self.prefix_cache_queries = counter("prefix_cache_queries_total", "Prompt tokens looked up in the prefix cache.")
        self.prefix_cache_hits = counter("prefix_cache_hits_total", "Prompt tokens found in the prefix cache.")
        self.prompt_tokens = counter("prompt_tokens_total", "Number of prefill tokens processed.")
        self.generation_tokens = counter("generation_tokens_total", "Number of generated tokens.")
        request_success = Counter(
            PREFIX + "request_success_total", "Number of finished requests, by finish reason.", m + ["finished_reason"], registry=r
        )
        self.request_success = {reason: request_success.labels(model_name, reason) for reason in FINISH_REASONS}
        self.time_to_first_token = histogram("time_to_first_token_seconds", "Time to first token, from arrival.", _TTFT_BUCKETS)
        self.inter_token_latency = histogram("inter_token_latency_seconds", "Time between consecutive output tokens.", _ITL_BUCKETS)
        self.e2e_request_latency = histogram("e2e_request_latency_seconds", "End-to-end request latency.", _E2E_BUCKETS)
        self.spec_decode_num_drafts = counter("spec_decode_num_drafts_total", "Steps in which a sequence verified proposals.")
        self.spec_decode_num_draft_tokens = counter("spec_decode_num_draft_tokens_total", "Proposed tokens verified.")
        self.spec_decode_num_accepted_tokens = counter("spec_decode_num_accepted_tokens_total", "Proposed tokens accepted.")
        per_position = Counter(PREFIX + "spec_decode_num_accepted_tokens_per_pos_total",
                               "Drafts whose proposal at this position (0 = the first) was accepted.", m + ["position"], registry=r)
        self.spec_decode_accepted_per_pos = lambda position: per_position.labels(model_name, str(position))
        self._last_spec_decode = SpecDecodeStats()
        self.iteration_tokens = histogram("iteration_tokens_total", "Tokens (prefill + decode) run per engine step.", _ITERATION_TOKEN_BUCKETS)
        self._last_cumulative = (0, 0, 0, 0, 0, 0)
        per_replica = m + ["replica"]
        self.replica_running = Gauge(PREFIX + "replica_num_requests_running", "Running requests of one data-parallel replica.",
                                     per_replica, registry=r)
        self.replica_waiting = Gauge(PREFIX + "replica_num_requests_waiting", "Waiting requests of one data-parallel replica.",
                                     per_replica, registry=r)
        self.replica_kv_usage = Gauge(PREFIX + "replica_kv_cache_usage_perc", "KV-cache usage of one data-parallel replica.",
                                      per_replica, registry=r)
        self.replica_prefix_hits = Gauge(PREFIX + "replica_prefix_cache_hits", "Prompt tokens one data-parallel replica found "
                                         "in its prefix cache, since start.", per_replica, registry=r)
        self.model_name = model_name

    def observe(self, stats: IterationStats) -> None:
        """Record one engine iteration (called from the engine thread; prometheus-client is thread-safe)."""
        engine = stats.engine
        if engine is not None:
            self.num_requests_running.set(engine.num_running)
            self.num_requests_waiting.set(engine.num_waiting)
            self.kv_cache_usage_perc.set(engine.kv_cache_usage)
            self.kv_cache_free_blocks.set(engine.num_free_blocks)
            spec = engine.spec_decode
            cumulative = (engine.num_preemptions, engine.prefix_cache_queries, engine.prefix_cache_hits,
                          *((spec.num_drafts, spec.num_draft_tokens, spec.num_accepted_tokens) if spec else (0, 0, 0)))
            counters = (self.num_preemptions, self.prefix_cache_queries, self.prefix_cache_hits, self.spec_decode_num_drafts,
                        self.spec_decode_num_draft_tokens, self.spec_decode_num_accepted_tokens)
            for counter, now, before in zip(counters, cumulative, self._last_cumulative):
                if now > before:
                    counter.inc(now - before)
            self._last_cumulative = cumulative
            if spec is not None:
                for position, accepted in enumerate(spec.since(self._last_spec_decode).accepted_per_position):
                    if accepted > 0:
                        self.spec_decode_accepted_per_pos(position).inc(accepted)
                self._last_spec_decode = spec.copy()
            for i, replica in enumerate(engine.replicas):
                labels = (self.model_name, str(i))
                self.replica_running.labels(*labels).set(replica.num_running)
                self.replica_waiting.labels(*labels).set(replica.num_waiting)
                self.replica_kv_usage.labels(*labels).set(replica.kv_cache_usage)
                self.replica_prefix_hits.labels(*labels).set(replica.prefix_cache_hits)

        if stats.prompt_tokens:
            self.prompt_tokens.inc(stats.prompt_tokens)
        if stats.generation_tokens:
            self.generation_tokens.inc(stats.generation_tokens)
        if stats.step is not None and stats.step.num_tokens:
            self.iteration_tokens.observe(stats.step.num_tokens)
        for seconds in stats.time_to_first_token:
            self.time_to_first_token.observe(seconds)
        for seconds in stats.inter_token_latency:
            self.inter_token_latency.observe(seconds)
        for request in stats.finished:
            self.request_success[request.finish_reason if request.finish_reason in self.request_success else "stop"].inc()
            self.e2e_request_latency.observe(request.e2e_seconds)

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
