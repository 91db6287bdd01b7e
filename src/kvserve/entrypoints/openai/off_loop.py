"""Run a request's CPU work (chat template rendering, tokenization) off the event loop, with a deadline.

The event loop answers every connection, `/health` included, so it must never
run anything whose time depends on the request: a 5 MB prompt takes seconds to
tokenize, and a Jinja template can loop. `run_off_loop` runs such work on a
thread of its own, at most `max_parallel` at a time, and gives up on it after
`timeout_s`: the caller gets `PreprocessTimeout`, and the thread is interrupted
at its next Python bytecode (`PyThreadState_SetAsyncExc`), which stops a
template loop. (Native code, such as the Rust tokenizer, finishes its current
call first.)
"""

from __future__ import annotations

import asyncio
import ctypes
import threading
from typing import Callable, TypeVar

T = TypeVar("T")


class PreprocessTimeout(Exception):
    """The work did not finish within its time limit."""


class _Interrupted(BaseException):
    """Raised inside a worker thread whose caller gave up on it."""


class _Worker(threading.Thread):
    def __init__(self, fn: Callable[[], T], loop: asyncio.AbstractEventLoop, future: asyncio.Future) -> None:
        super().__init__(name="kvserve-preprocess", daemon=True)
        self._fn = fn
        self._loop = loop
        self._future = future
        self._lock = threading.Lock()
        self._returned = False

    def run(self) -> None:
        try:
            try:
                outcome: tuple[object, BaseException | None] = (self._fn(), None)
            except BaseException as exc:
                outcome = (None, exc)
            with self._lock:
                self._returned = True
        except _Interrupted:  # arrived as `fn` returned: its caller has already given up
            return
        self._loop.call_soon_threadsafe(_settle, self._future, *outcome)

    def interrupt(self) -> None:
        with self._lock:
            if not self._returned and self.ident is not None:
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self.ident), ctypes.py_object(_Interrupted))


def _settle(future: asyncio.Future, result: object, exc: BaseException | None) -> None:
    if future.done():
        return
    if exc is None:
        future.set_result(result)
    else:
        future.set_exception(exc)


class OffLoopRunner:
    """Runs callables on worker threads, `max_parallel` at a time, each within `timeout_s` seconds."""

    def __init__(self, timeout_s: float, max_parallel: int = 4) -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.timeout_s = timeout_s
        self._slots = asyncio.Semaphore(max_parallel)

    async def run(self, fn: Callable[[], T]) -> T:
        """`fn()` computed on a worker thread; raises `PreprocessTimeout` after `timeout_s` (and interrupts it)."""
        async with self._slots:
            future = asyncio.get_running_loop().create_future()
            worker = _Worker(fn, asyncio.get_running_loop(), future)
            worker.start()
            try:
                return await asyncio.wait_for(future, self.timeout_s)  # cancels `future` when it gives up
            except asyncio.TimeoutError:
                worker.interrupt()
                raise PreprocessTimeout(f"took longer than {self.timeout_s:g} s") from None
            except asyncio.CancelledError:  # the client went away
                worker.interrupt()
                raise
