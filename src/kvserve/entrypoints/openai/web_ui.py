"""The web pages of `kvserve serve`: a chat at `/`, the engine live at `/dashboard`.

Both are static files inside the package (`static/`: plain HTML, JS and CSS, nothing from another
origin) that talk to this server only: the chat to /v1/chat/completions, the dashboard to
`/dashboard/events`, a server-sent-event stream of `DashboardFeed` frames, a few a second.

Security: every page and file goes out with a Content-Security-Policy that allows scripts, styles
and connections from this origin alone (no inline script, no remote script, no framing), with
`nosniff` and no referrer. The pages and their files hold no data and are served without the API
key (a browser cannot send a header while navigating); everything with data — the event stream
and the API itself — needs it when `--api-key` is set, which the pages ask for once and keep in
the browser's local storage.

While at least one dashboard is connected, the engine thread adds a snapshot of the block pool to
an iteration at most every `SNAPSHOT_INTERVAL_S`; with none, it takes none.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse, StreamingResponse
from starlette.staticfiles import StaticFiles

from kvserve.engine.async_engine import AsyncLLMEngine
from kvserve.entrypoints.openai.dashboard_feed import DashboardFeed
from kvserve.estimate.step_roofline import step_roofline

logger = logging.getLogger("kvserve.server")

STATIC_DIR = Path(__file__).with_name("static")
FRAME_INTERVAL_S = 0.25  # frames a dashboard gets
SNAPSHOT_INTERVAL_S = 0.25  # block-pool snapshots the engine thread takes while a dashboard is open
_PAGES = {"/": "chat.html", "/dashboard": "dashboard.html"}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def is_public(path: str) -> bool:
    """Whether `path` is a page or one of its files (served without the API key: they hold no data)."""
    return path in _PAGES or path.startswith("/static/")


class _StaticFiles(StaticFiles):
    def file_response(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        response = super().file_response(*args, **kwargs)
        response.headers.update(SECURITY_HEADERS)
        return response


class _Dashboards:
    """The connected dashboards: snapshots are asked of the engine while there is one."""

    def __init__(self, engine: AsyncLLMEngine, feed: DashboardFeed) -> None:
        self.engine = engine
        self.feed = feed
        self.count = 0
        self._roofline_task: asyncio.Task | None = None

    def connect(self) -> None:
        self.count += 1
        if self.count == 1:
            self.engine.request_snapshots(SNAPSHOT_INTERVAL_S)
        if self._roofline_task is None:  # the machine's floors: measured once (cached on disk), off the loop
            self._roofline_task = asyncio.ensure_future(asyncio.to_thread(self._make_roofline))

    def disconnect(self) -> None:
        self.count -= 1
        if self.count == 0:
            self.engine.request_snapshots(None)

    def _make_roofline(self) -> None:
        engine = self.engine.engine
        config = engine.config
        try:
            self.feed.roofline = step_roofline(engine.hf_config, engine.worker_info.weight_bytes, engine.kv_bytes_per_token(),
                                               config.torch_dtype, config.device)
        except Exception:
            logger.exception("the dashboard's roofline has no floors: measuring this machine failed")

    async def events(self) -> AsyncIterator[str]:
        """Frames until the engine stops; a client that leaves ends it at the next write (the response is
        cancelled, and `finally` runs)."""
        self.connect()
        try:
            while self.engine.is_running:
                yield f"data: {json.dumps(self.feed.frame(), separators=(',', ':'))}\n\n"
                await asyncio.sleep(FRAME_INTERVAL_S)
        finally:
            self.disconnect()


def mount_web_ui(app: FastAPI, async_engine: AsyncLLMEngine, model_name: str) -> None:
    """Add the pages, their files and the dashboard's event stream to `app`."""
    engine = async_engine.engine
    config = engine.config
    feed = DashboardFeed(model_name, engine.stats().num_blocks, config.block_size, config.max_num_batched_tokens,
                         config.max_num_seqs)
    async_engine.stats_listeners.append(feed.observe)
    dashboards = _Dashboards(async_engine, feed)

    def page(name: str):  # type: ignore[no-untyped-def]
        async def serve_page() -> FileResponse:
            return FileResponse(STATIC_DIR / name, media_type="text/html", headers=SECURITY_HEADERS)
        return serve_page

    for path, name in _PAGES.items():
        app.add_api_route(path, page(name), methods=["GET"], include_in_schema=False)

    @app.get("/dashboard/events", include_in_schema=False)
    async def dashboard_events() -> StreamingResponse:
        return StreamingResponse(dashboards.events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", **SECURITY_HEADERS})

    app.mount("/static", _StaticFiles(directory=STATIC_DIR), name="static")
