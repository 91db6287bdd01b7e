"""AsyncLLMEngine: LLMEngine driven by a background thread, with one async stream per request.

`LLMEngine` is not thread-safe, so exactly one thread, the *engine thread*, ever
touches it. The asyncio event loop (the HTTP server) never runs a forward pass;
it talks to the engine thread through two inboxes guarded by one lock:

    loop --(new requests, aborts)--> engine thread: add / abort / step()
    engine thread --(loop.call_soon_threadsafe, once per step)--> loop: outputs to streams

A request added while others run is picked up at the top of the next iteration
and joins the running batch at the next `step()` (continuous batching). After
every iteration the thread hands an `IterationStats` (what the iteration did,
and `engine.stats()` after it) to its listeners (the Prometheus metrics, the
live dashboard, the log of requests and stats), so nothing else needs to read engine state across threads.
While someone asks for them (`request_snapshots`), an iteration also carries an
`EngineSnapshot` of the block pool and block tables, at most one per interval.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from kvserve.engine.llm_engine import EngineDeadError, LLMEngine, StepStats
from kvserve.engine.scheduler import SchedulerStats
from kvserve.engine.snapshot import EngineSnapshot
from kvserve.outputs import CompletionOutput, RequestOutput
from kvserve.sampling_params import SamplingParams

logger = logging.getLogger("kvserve.async_engine")


class EngineOverloadedError(RuntimeError):
    """More requests are waiting than `max_waiting_requests` allows (the server answers 503)."""


class EngineStoppedError(RuntimeError):
    """The engine is shutting down or no longer running (the server answers 503)."""


@dataclass
class IterationStats:
    """What one engine-thread iteration did, and the engine's state after it (for metrics).

    `engine` is `LLMEngine.stats()` (queues, blocks, cumulative preemption and
    prefix-cache counters); token counts, latencies and finished requests cover
    this iteration only.
    """

    engine: SchedulerStats | None = None
    step: StepStats | None = None
    prompt_tokens: int = 0
    generation_tokens: int = 0
    time_to_first_token: list[float] = field(default_factory=list)
    inter_token_latency: list[float] = field(default_factory=list)
    finished: list[FinishedRequest] = field(default_factory=list)
    snapshot: EngineSnapshot | None = None  # only while snapshots are asked for (`request_snapshots`)
    time: float = field(default_factory=time.monotonic)  # when the iteration began


@dataclass(frozen=True)
class FinishedRequest:
    """One request that ended in an iteration: how, how big, and how long it took (from its arrival)."""

    request_id: str
    finish_reason: str  # stop, length, abort or error
    prompt_tokens: int
    output_tokens: int  # over all of its outputs (n > 1)
    time_to_first_token: float | None  # None: it ended before its first token
    e2e_seconds: float


@dataclass
class _NewRequest:
    request_id: str
    prompt: str | list[int] | None
    params: SamplingParams
    prompt_token_ids: list[int] | None
    accepted: asyncio.Future
    arrival: float


@dataclass
class _Timing:
    arrival: float
    first_token: float | None = None
    last_token: float | None = None
    prompt_tokens: int = 0
    output_tokens: int = 0

    def finished(self, request_id: str, reason: str, now: float) -> FinishedRequest:
        ttft = None if self.first_token is None else self.first_token - self.arrival
        return FinishedRequest(request_id, reason, self.prompt_tokens, self.output_tokens, ttft, now - self.arrival)


class RequestStream:
    """The RequestOutputs of one request, in order, ending with the finished one.

    The engine thread never waits for a reader. Outputs the reader has not taken
    yet are merged into one (their new texts and token ids joined; every output
    is cumulative otherwise), so a client that stops reading holds one output
    here, not one per step. `ready` is set while something waits to be taken; a
    reader of several streams may give them one shared event (see `Choices`).
    """

    def __init__(self, request_id: str, prompt_token_ids: list[int] | None) -> None:
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids or []
        self.last: RequestOutput | None = None
        self.ready = asyncio.Event()
        self._pending: RequestOutput | BaseException | None = None
        self._done = False

    def put(self, item: RequestOutput | BaseException) -> None:
        if isinstance(self._pending, BaseException):
            return  # an error ends the stream; nothing comes after it
        if isinstance(item, RequestOutput):
            self.last = item
            if self._pending is not None:
                item = _merge(self._pending, item)
        self._pending = item
        self.ready.set()

    def take(self) -> RequestOutput | None:
        """What waits now (one output, merged), or None; raises the error that ended the stream."""
        item, self._pending = self._pending, None
        if isinstance(item, BaseException):
            self._done = True
            raise item
        if item is not None and item.finished:
            self._done = True
        return item

    @property
    def done(self) -> bool:
        """True once the finished output or an error has been taken."""
        return self._done

    def aborted_output(self) -> RequestOutput:
        """A final output ending the request with finish_reason "abort", keeping what it produced."""
        last = self.last
        if last is None:
            completion = CompletionOutput(index=0, text="", token_ids=[], finish_reason="abort")
            return RequestOutput(self.request_id, None, self.prompt_token_ids, [completion], True, new_text=[""], new_token_ids=[[]])
        completions = [dataclasses.replace(c, finish_reason="abort", stop_reason=None) for c in last.outputs]
        return dataclasses.replace(last, outputs=completions, finished=True, new_text=[""] * len(completions),
                                   new_token_ids=[[] for _ in completions])

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self

    async def __anext__(self) -> RequestOutput:
        while not self._done:
            item = self.take()
            if item is not None:
                return item
            self.ready.clear()
            await self.ready.wait()
        raise StopAsyncIteration


def _merge(older: RequestOutput, newer: RequestOutput) -> RequestOutput:
    """`newer`, carrying the deltas of `older` in front of its own: what a reader gets who took neither in time."""
    if len(older.new_text) != len(newer.new_text):
        return newer  # the outputs were regrouped (best_of, beams): those report only once, finished
    return dataclasses.replace(
        newer,
        new_text=[a + b for a, b in zip(older.new_text, newer.new_text)],
        new_token_ids=[a + b for a, b in zip(older.new_token_ids, newer.new_token_ids)],
    )


class AsyncLLMEngine:
    """Serve an `LLMEngine` to asyncio code.

    Call `start()` from the event loop, then `await add_request(...)` (raises
    ValueError for a bad prompt, EngineOverloadedError when the waiting queue is
    full) and iterate the returned stream. `abort()` stops a request and frees its
    KV blocks; `shutdown()` ends every open stream with finish_reason "abort".
    """

    def __init__(
        self,
        engine: LLMEngine,
        max_waiting_requests: int | None = None,
        stats_listeners: list[Callable[[IterationStats], None]] | None = None,
    ) -> None:
        if max_waiting_requests is not None and (not isinstance(max_waiting_requests, int) or max_waiting_requests < 1):
            raise ValueError(f"max_waiting_requests must be an integer >= 1 or None, got {max_waiting_requests!r}")
        self.engine = engine
        self.max_waiting_requests = max_waiting_requests
        self.stats_listeners = list(stats_listeners or [])  # each called on the engine thread after every iteration
        self.max_batch_size = 0  # the most sequences one step has run, since start
        self.num_steps = 0

        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._inbox: list[_NewRequest] = []
        self._aborts: list[str] = []
        self._snapshot_interval_s: float | None = None  # set by the event loop, read by the engine thread
        self._snapshot_due = False  # the next iteration takes a snapshot, even with nothing to run
        self._last_snapshot = 0.0
        self._num_waiting = 0  # requests accepted but not yet running, as the engine thread last saw it
        self._stopping = False

        self._streams: dict[str, RequestStream] = {}  # touched by the event loop only
        self._timings: dict[str, _Timing] = {}  # touched by the engine thread only
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.dead_error: EngineDeadError | None = None
        self.on_dead: Callable[[], None] | None = None  # called on the event loop once the engine thread has died

    # ---- properties read by the server -------------------------------------------

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def grammar_compiler(self) -> Any:
        """The engine's structured-output compiler (thread-safe): the server compiles constraints before queueing."""
        return self.engine.grammar_compiler

    @property
    def sampling_defaults(self) -> dict[str, Any]:
        """SamplingParams keywords from the model's generation_config.json (`--generation-config`)."""
        return self.engine.sampling_defaults

    @property
    def max_model_len(self) -> int:
        return int(self.engine.config.max_model_len)

    @property
    def streaming(self) -> bool:
        """Whether requests stream through attention sinks and a window, and may grow past max_model_len."""
        return self.engine.config.streaming_window is not None

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    # ---- event-loop side -------------------------------------------------------------

    def start(self) -> None:
        """Start the engine thread; must be called from the event loop that will read the streams."""
        if self._thread is not None:
            raise RuntimeError("AsyncLLMEngine.start() was already called")
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="kvserve-engine", daemon=True)
        self._thread.start()

    async def add_request(
        self,
        request_id: str,
        prompt: str | list[int] | None,
        params: SamplingParams,
        prompt_token_ids: list[int] | None = None,
    ) -> RequestStream:
        """Queue a request; returns its stream once the engine thread has accepted it."""
        if not self.is_running:
            raise EngineStoppedError("the engine is not running (shutting down or stopped after an error)")
        if request_id in self._streams:
            raise ValueError(f"request_id {request_id!r} is already in use")
        assert self._loop is not None
        accepted = self._loop.create_future()
        new = _NewRequest(request_id, prompt, params, prompt_token_ids, accepted, time.monotonic())
        with self._lock:
            waiting = len(self._inbox) + self._num_waiting
            if self.max_waiting_requests is not None and waiting >= self.max_waiting_requests:
                raise EngineOverloadedError(
                    f"the server is overloaded: {waiting} requests are already waiting "
                    f"(max_waiting_requests={self.max_waiting_requests}); retry later"
                )
            self._inbox.append(new)
            self._wakeup.notify()
        stream = RequestStream(request_id, prompt_token_ids if prompt_token_ids is not None else _ids_or_none(prompt))
        self._streams[request_id] = stream
        try:
            await accepted
        except asyncio.CancelledError:
            self.abort(request_id)
            raise
        except BaseException:
            self._streams.pop(request_id, None)
            raise
        return stream

    def abort(self, request_id: str) -> None:
        """Stop a request (e.g. its client went away) and free its KV blocks. Idempotent."""
        self._streams.pop(request_id, None)
        with self._lock:
            self._aborts.append(request_id)
            self._wakeup.notify()

    def request_snapshots(self, interval_s: float | None) -> None:
        """Have iterations carry an `EngineSnapshot` at most every `interval_s` seconds, and one at once (the
        engine thread wakes for it even when idle); None stops them. Each costs a pass over the block pool."""
        with self._lock:
            self._snapshot_interval_s = interval_s
            self._snapshot_due = interval_s is not None
            self._wakeup.notify()

    def begin_shutdown(self) -> None:
        """Stop accepting requests and end every open stream now with finish_reason "abort"."""
        with self._lock:
            self._stopping = True
            self._wakeup.notify()
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            stream.put(stream.aborted_output())

    async def shutdown(self, timeout_s: float = 5.0) -> None:
        """`begin_shutdown()`, then wait (without blocking the loop) for the engine thread to exit."""
        self.begin_shutdown()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, timeout_s)
        self.engine.shutdown()  # the worker processes of a multi-rank executor

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue  # aborted meanwhile
            stream.put(out)
            if out.finished:
                del self._streams[out.request_id]

    def _fail_all(self, exc: BaseException) -> None:
        """The engine thread died: fail every open stream and every request it never picked up, then
        call `on_dead` (the server exits, so that a supervisor restarts it)."""
        dead = exc if isinstance(exc, EngineDeadError) else EngineDeadError(f"the engine thread died: {exc!r}")
        self.dead_error = dead
        with self._lock:
            orphans, self._inbox = self._inbox, []
        for req in orphans:
            if not req.accepted.done():
                req.accepted.set_exception(dead)
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            stream.put(dead)
        if self.on_dead is not None:
            self.on_dead()

    # ---- engine-thread side ------------------------------------------------------

    def _run(self) -> None:
        loop = self._loop
        assert loop is not None
        engine = self.engine
        try:
            self._publish(self._fill_state(IterationStats()))  # the gauges read true before the first request
            while True:
                with self._lock:
                    while not (self._inbox or self._aborts or self._stopping or self._snapshot_due
                               or engine.has_unfinished_requests()):
                        self._wakeup.wait()
                    new, self._inbox = self._inbox, []
                    aborts, self._aborts = self._aborts, []
                    self._num_waiting += len(new)
                    stopping = self._stopping
                stats = IterationStats()
                if new:
                    self._add(new, loop)
                for request_id in aborts:
                    self._abort(request_id, stats)
                if stopping:
                    for request_id in engine.unfinished_request_ids():
                        self._abort(request_id, stats)
                    self._publish(self._fill_state(stats))
                    return
                outputs: list[RequestOutput] = []
                if engine.has_unfinished_requests():
                    outputs = engine.step()
                    stats.step = engine.last_step
                    stats.generation_tokens = engine.last_step.num_generated_tokens
                    self.num_steps += 1
                    self.max_batch_size = max(self.max_batch_size, engine.last_step.num_seqs)
                    self._time_outputs(outputs, stats)
                    if outputs:
                        loop.call_soon_threadsafe(self._deliver, outputs)
                self._publish(self._fill_state(stats))
        except BaseException as exc:  # EngineDeadError, a bug, an out-of-memory: fail every stream, don't hang them
            logger.critical("the engine thread died", exc_info=exc)
            with self._lock:
                self._stopping = True
            if not loop.is_closed():
                loop.call_soon_threadsafe(self._fail_all, exc)

    def _add(self, new: list[_NewRequest], loop: asyncio.AbstractEventLoop) -> None:
        results: list[tuple[asyncio.Future, BaseException | None]] = []
        for req in new:
            try:
                self.engine.add_request(req.request_id, req.prompt, req.params, req.prompt_token_ids)
            except Exception as exc:  # ValueError for a bad prompt; reported to that caller alone
                results.append((req.accepted, exc))
                continue
            self._timings[req.request_id] = _Timing(req.arrival)
            results.append((req.accepted, None))
        loop.call_soon_threadsafe(_resolve_all, results)

    def _abort(self, request_id: str, stats: IterationStats) -> None:
        self.engine.abort_request(request_id)  # unknown ids (finished, failed, aborted twice) are ignored
        timing = self._timings.pop(request_id, None)
        if timing is not None:
            stats.finished.append(timing.finished(request_id, "abort", time.monotonic()))

    def _time_outputs(self, outputs: list[RequestOutput], stats: IterationStats) -> None:
        now = time.monotonic()
        for out in outputs:
            timing = self._timings.get(out.request_id)
            if timing is None:
                continue
            num_new = sum(len(ids) for ids in out.new_token_ids)
            if timing.last_token is None:
                timing.prompt_tokens = len(out.prompt_token_ids)
                stats.prompt_tokens += timing.prompt_tokens
                stats.time_to_first_token.append(now - timing.arrival)
                timing.first_token = now
            elif num_new:
                stats.inter_token_latency.append(now - timing.last_token)
            if num_new:
                timing.last_token = now
            timing.output_tokens = sum(len(c.token_ids) for c in out.outputs)
            if out.finished:
                del self._timings[out.request_id]
                stats.finished.append(timing.finished(out.request_id, out.outputs[0].finish_reason or "stop", now))

    def _fill_state(self, stats: IterationStats) -> IterationStats:
        """Add the engine's state to `stats` (and refresh the waiting count), and a snapshot when one is due: on
        request, when the interval has passed, or when the engine falls idle (the last picture stays true)."""
        stats.engine = self.engine.stats()
        now = time.monotonic()
        with self._lock:
            self._num_waiting = stats.engine.num_waiting
            interval = self._snapshot_interval_s
            due = interval is not None and (self._snapshot_due or now - self._last_snapshot >= interval
                                            or not self.engine.has_unfinished_requests())
            self._snapshot_due = False
        if due:
            stats.snapshot = self.engine.snapshot()
            self._last_snapshot = now
        return stats

    def _publish(self, stats: IterationStats) -> None:
        for listener in self.stats_listeners:
            try:
                listener(stats)
            except Exception:
                logger.exception("the stats listener %r failed", listener)


def _resolve_all(results: list[tuple[asyncio.Future, BaseException | None]]) -> None:
    for future, exc in results:
        if future.done():
            continue  # the caller gave up (cancelled); it aborts the request itself
        if exc is None:
            future.set_result(None)
        else:
            future.set_exception(exc)


def _ids_or_none(prompt: str | list[int] | None) -> list[int] | None:
    return list(prompt) if isinstance(prompt, list) else None
