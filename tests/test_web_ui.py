"""The web pages of `kvserve serve`: the chat at `/`, the live dashboard at `/dashboard`, and what feeds them.

The snapshot the dashboard draws is checked against the block manager's own state; the pages'
security (same-origin files only, a CSP, the API key on the data) over HTTP; and the pages
themselves in a real headless Chromium (Debian's `chromium`, driven by Playwright; `make test`
installs it), against one server with an API key: a streamed answer, a stop that aborts the
request on the server, and the dashboard showing shared blocks and prefix-cache hits while a
batch with a shared prefix runs, each page saved as a screenshot (the README's are taken the same way
on the default model by benchmarks/web_screenshots.py).
"""

from __future__ import annotations

import json
import re
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import expect, sync_playwright

from kvserve.config import EngineConfig
from kvserve.engine.block_manager import BlockManager
from kvserve.engine.scheduler import _attention_pairs, _keys_read
from kvserve.engine.sequence import Sequence
from kvserve.engine.snapshot import CACHED, DROPPED, FREE, SHARED, USED
from kvserve.entrypoints.openai.web_ui import STATIC_DIR
from kvserve.sampling_params import SamplingParams
from server_utils import KV_BYTES, TIMEOUT, ServerThread

KEY = "sk-web-test"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
BROWSER_TIMEOUT_MS = 30_000


# ---- the engine's snapshot ----------------------------------------------------------------


def _seq(tokens: list[int]) -> Sequence:
    return Sequence("r", tokens, SamplingParams(max_tokens=4))


def _assert_matches_blocks(bm: BlockManager) -> None:
    state = bm.pool_state()
    assert state.ref_counts.tolist() == [b.ref_count for b in bm.blocks]
    assert state.cached.tolist() == [b.hash is not None for b in bm.blocks]


def test_pool_state_is_the_block_managers_ref_counts_and_cache() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    a = _seq(list(range(10)))
    assert bm.allocate(a, 10)
    a.num_computed_tokens = 10
    bm.register_full_blocks(a)
    child = _seq(list(range(10)))
    bm.fork(a.seq_id, child.seq_id)  # every block of `a` shared
    b = _seq(list(range(8)) + [99, 98, 97])  # its first 2 blocks come from the prefix cache
    cached = bm.cached_prefix(b)
    assert len(cached) == 2 and bm.allocate(b, len(b) - 8, cached)
    _assert_matches_blocks(bm)
    states = bm.pool_state().states()
    assert states[bm.block_table(a.seq_id)[:2]].tolist() == [SHARED, SHARED]
    assert states[bm.block_table(b.seq_id)[2]] == USED
    bm.free(a.seq_id), bm.free(child.seq_id), bm.free(b.seq_id)
    _assert_matches_blocks(bm)
    states = bm.pool_state().states()
    assert sorted(set(states.tolist())) == [FREE, CACHED] and (states == CACHED).sum() == 2


def test_display_table_marks_blocks_dropped_behind_the_window() -> None:
    bm = BlockManager(num_blocks=16, block_size=4, sliding_window=8)
    seq = _seq(list(range(20)))
    assert bm.allocate(seq, 20)
    seq.num_computed_tokens = 20
    bm.drop_outside_window(seq)
    table = bm.display_table(seq.seq_id)
    behind = (20 - 8 + 1) // 4  # blocks wholly before the next query's window
    assert table[:behind] == [DROPPED] * behind and table[behind:] == bm.held_blocks(seq.seq_id) == bm.block_table(seq.seq_id)[behind:]
    _assert_matches_blocks(bm)


@pytest.mark.parametrize("window", [None, 1, 5, 64])
@pytest.mark.parametrize("computed, n", [(0, 1), (0, 9), (7, 1), (7, 6), (30, 3)])
def test_attention_pairs_and_keys_read_count_what_causal_queries_weigh(window: int | None, computed: int, n: int) -> None:
    weighed = [range(max(0, p + 1 - window) if window else 0, p + 1) for p in range(computed, computed + n)]
    assert _attention_pairs(computed, n, window) == sum(len(keys) for keys in weighed)
    assert _keys_read(computed, n, window) == len(set().union(*weighed))


# ---- the server: files, headers, the key ----------------------------------------------------


@pytest.fixture(scope="module")
def server(chat_llama: Path) -> Iterator[ServerThread]:
    config = EngineConfig(model=str(chat_llama), dtype="float32", kv_cache_memory_bytes=KV_BYTES, max_num_seqs=8,
                          block_size=4, max_num_batched_tokens=256)
    handle = ServerThread(config, "tiny-chat", api_key=KEY)
    yield handle
    handle.stop()


def _auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {KEY}"}


def test_pages_come_without_the_key_and_with_a_same_origin_policy(server: ServerThread) -> None:
    for path in ("/", "/dashboard", "/static/chat.js", "/static/dashboard.js", "/static/kvserve.css"):
        response = httpx.get(server.url + path, timeout=TIMEOUT)
        assert response.status_code == 200, path
        csp = response.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "connect-src 'self'" in csp and "default-src 'none'" in csp
        assert response.headers["x-content-type-options"] == "nosniff"
    for page in ("chat.html", "dashboard.html"):
        html = (STATIC_DIR / page).read_text()
        assert "<script>" not in html and " style=" not in html  # nothing inline: the policy would refuse it
        assert all(url.startswith("/") for url in re.findall(r'(?:src|href)="([^"]+)"', html))
    for file in STATIC_DIR.iterdir():  # no file names another origin
        assert "http://" not in file.read_text() and "https://" not in file.read_text(), file.name
    assert httpx.get(server.url + "/static/%2e%2e/server.py", timeout=TIMEOUT).status_code == 404  # only the static files


def _first_frame(server: ServerThread, ready: str) -> dict:
    """The first dashboard frame in which `ready` (a key) is set, within TIMEOUT."""
    deadline = time.monotonic() + TIMEOUT
    with httpx.stream("GET", server.url + "/dashboard/events", headers=_auth(), timeout=TIMEOUT) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            assert time.monotonic() < deadline, f"no frame with {ready}"
            frame = json.loads(line[len("data: "):]) if line.startswith("data: ") else {}
            if frame.get(ready):
                return frame
    raise AssertionError("the event stream ended")


def test_the_dashboards_data_needs_the_key(server: ServerThread) -> None:
    assert httpx.get(server.url + "/dashboard/events", timeout=TIMEOUT).status_code == 401
    frame = _first_frame(server, "pools")  # the first snapshot comes with the engine thread's next iteration
    assert frame["num_blocks"] == server.num_blocks and frame["block_size"] == 4 and frame["max_num_batched_tokens"] == 256
    assert len(frame["pools"][0]["states"]) == server.num_blocks


# ---- the pages in a real browser --------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator:
    if CHROMIUM is None:
        pytest.fail("chromium is not installed: `make test` installs Debian's package (apt-get install chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"], timeout=BROWSER_TIMEOUT_MS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server: ServerThread) -> Iterator:
    context = browser.new_context(viewport={"width": 1200, "height": 760})
    page = context.new_page()
    page.set_default_timeout(BROWSER_TIMEOUT_MS)
    expect.set_options(timeout=BROWSER_TIMEOUT_MS)
    errors: list[str] = []
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.errors = errors
    yield page
    context.close()
    # 401s are how the pages learn that a key is needed; anything else (a CSP refusal, a script error) fails the test
    assert [e for e in errors if "401" not in e] == []


def _screenshot(page, name: str, tmp_path: Path) -> None:
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 1000


def _enter_key(page) -> None:
    page.wait_for_selector("#key-dialog:not(.hidden)")
    page.fill("#key-input", KEY)
    page.click("#key-form button")


def _aborted(server: ServerThread) -> float:
    text = httpx.get(server.url + "/metrics", headers=_auth(), timeout=TIMEOUT).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("kvserve:request_success_total{") and 'finished_reason="abort"' in line)


def test_chat_streams_an_answer_and_keeps_the_conversation(page, server: ServerThread, tmp_path: Path) -> None:
    page.goto(server.url + "/")
    _enter_key(page)
    expect(page.locator("#model")).to_contain_text("tiny-chat")
    page.fill("#system", "You are terse.")
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "24")
    page.fill("#input", "Tell me about **paged** attention")
    page.press("#input", "Enter")
    answer = page.wait_for_selector(".msg.assistant.done")
    assert answer.query_selector(".content").inner_text().strip()
    stats = answer.query_selector(".stats").inner_text()
    assert re.search(r"\d+ prompt tokens · 24 tokens · [\d.]+ tok/s", stats), stats
    assert page.inner_text(".msg.user") == "Tell me about **paged** attention"
    _screenshot(page, "chat.png", tmp_path)
    page.reload()  # the conversation and the settings come back from local storage; the key is not asked again
    page.wait_for_selector(".msg.assistant .stats")
    assert page.locator(".msg").count() == 2 and page.input_value("#system") == "You are terse."
    server.wait_idle()


def test_stop_ends_the_answer_and_the_server_aborts_it(page, server: ServerThread, monkeypatch) -> None:
    scheduler = server.engine.engine.scheduler
    schedule = scheduler.schedule

    def slow_schedule():  # 10 ms a step: the 400-token answer outlasts the browser's click, however loaded the machine
        time.sleep(0.01)
        return schedule()

    monkeypatch.setattr(scheduler, "schedule", slow_schedule)
    before = _aborted(server)
    page.goto(server.url + "/")
    _enter_key(page)
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "400")
    page.fill("#input", "Write a long story")
    page.press("#input", "Enter")
    expect(page.locator(".msg.assistant .content")).not_to_be_empty()
    page.click("#stop")
    answer = page.wait_for_selector(".msg.assistant.done")
    assert "stopped" in answer.query_selector(".stats").inner_text()
    deadline = time.monotonic() + 10
    while _aborted(server) == before:
        assert time.monotonic() < deadline, "the server never aborted the request"
        time.sleep(0.05)
    server.wait_idle()


def test_dashboard_shows_shared_blocks_and_prefix_hits(page, server: ServerThread, tmp_path: Path) -> None:
    page.goto(server.url + "/dashboard")
    _enter_key(page)
    page.wait_for_selector("body[data-frames]")
    shared_prefix = "the same long system prompt that every request of the batch begins with " * 3

    def request(i: int) -> None:
        httpx.post(server.url + "/v1/completions", headers=_auth(), timeout=TIMEOUT, json={
            "model": "tiny-chat", "prompt": shared_prefix + f"question {i}", "max_tokens": 300, "ignore_eos": True,
            "temperature": 0, "n": 2,
        }).raise_for_status()

    # 12 requests of two outputs on 8 sequence slots: blocks stay shared for several seconds, many frames' worth
    threads = [threading.Thread(target=request, args=(i,)) for i in range(12)]
    for i, thread in enumerate(threads):
        thread.start()
        time.sleep(0.15 if i == 0 else 0.02)  # the first computes the prefix; the others find it cached
    try:
        expect(page.locator("#count-shared")).not_to_have_text("0")
        page.wait_for_selector("#requests .seq .blocks i.shared")
        _screenshot(page, "dashboard.png", tmp_path)
    finally:
        for thread in threads:
            thread.join(TIMEOUT)
    expect(page.locator("#stat-hit-rate")).to_have_text(re.compile(r"%$"))
    assert float(page.inner_text("#stat-hit-rate").rstrip("%")) > 0
    expect(page.locator("#count-used")).to_have_text("0")  # all done: nothing held
    assert int(page.inner_text("#count-cached")) > 0
    server.wait_idle()


def test_frames_carry_steps_latencies_and_the_roofline(server: ServerThread) -> None:
    response = httpx.post(server.url + "/v1/completions", headers=_auth(), timeout=TIMEOUT,
                          json={"model": "tiny-chat", "prompt": "Once upon a time", "max_tokens": 8, "ignore_eos": True})
    assert response.status_code == 200
    frame = _first_frame(server, "roofline")
    assert sum(frame["ttft_counts"]) >= 1 and sum(frame["itl_counts"]) >= 7
    assert len(frame["latency_edges"]) == len(frame["ttft_counts"]) + 1
    assert sum(row[1] for row in frame["timeline"]) >= 8  # output tokens per second, last minute
    age, decode, prefill, seqs, preempted, ms, flops, nbytes = frame["steps"][-1]
    assert decode == 1 and prefill == 0 and seqs == 1 and ms > 0
    roof = frame["roofline"]
    assert roof["bandwidth"] > 0 and roof["peak_flops"] > 0 and roof["dtype"] == "fp32"
    assert nbytes > 1e5 and 0 < flops / nbytes < roof["peak_flops"] / roof["bandwidth"]  # a decode step: memory-bound
    server.wait_idle()
