"""Start-up feedback: a log line for each phase of loading a model that takes long, and the total.

A user who waits 50 s for a first token should see why: the C++ kernels being
built (first run only), a GGUF's metadata being converted (first run only), the
weights loading (with a progress bar), the KV cache being allocated. Every line goes
to the `kvserve.startup` logger, which the `kvserve` command shows at its default
log level (`--log-level ERROR` silences it); a phase shorter than `SLOW_PHASE_S`
says nothing, and `ready` always gives the total.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

logger = logging.getLogger("kvserve.startup")

SLOW_PHASE_S = 1.0  # phases faster than this are not worth a line

T = TypeVar("T")


@contextmanager
def phase(what: str, first_run_only: bool = False) -> Iterator[None]:
    """Time `what`; log how long it took if that is more than SLOW_PHASE_S. `first_run_only`: a phase whose
    result is cached (a kernel build, a GGUF conversion), announced when it starts, since it is always slow."""
    if first_run_only:
        logger.info("%s (first run only, the result is cached) ...", what)
    started = time.perf_counter()
    yield
    elapsed = time.perf_counter() - started
    if elapsed > SLOW_PHASE_S:
        logger.info("%s took %.1f s", what, elapsed)


def progress(items: Iterable[T], total: int | None, description: str, unit: str, show: bool = True) -> Iterable[T]:
    """`items`, behind a tqdm bar on a terminal that appears only once SLOW_PHASE_S have passed."""
    from tqdm import tqdm

    return tqdm(items, total=total, desc=description, unit=unit, delay=SLOW_PHASE_S, disable=None if show else True,
                leave=False, dynamic_ncols=True)


def ready(what: str, started: float) -> None:
    """The total start-up time of `what`, from `started` (a `time.perf_counter()` reading)."""
    logger.info("%s ready in %.1f s", what, time.perf_counter() - started)
