"""The README's screenshots of the web pages, taken on the built-in default model in headless Chromium.

    python benchmarks/web_screenshots.py [--out docs/images] [-- extra `kvserve serve` arguments]

Starts `kvserve serve` (SmolLM2-135M-Instruct unless told otherwise, with a small KV cache so the block
grid is legible), asks the chat page one question, then opens the dashboard while a batch of requests
sharing a long prefix runs (some with n=2), and saves chat.png and dashboard.png. Needs the system's
chromium (`apt-get install chromium`) and the playwright package (the dev extra).
"""

from __future__ import annotations

import argparse
import shutil
import threading
import time
from pathlib import Path

import httpx
from playwright.sync_api import expect, sync_playwright

from dashboard_overhead import start_server

SHARED_PREFIX = ("You are a patient teacher. Answer in three short paragraphs, with one example each, "
                 "and end with a one-line summary. ") * 3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/images")
    parser.add_argument("--port", type=int, default=8766)
    args, serve_args = parser.parse_known_args()
    serve_args = [a for a in serve_args if a != "--"] or ["--kv-cache-memory-bytes", "96MiB", "--max-num-seqs", "8"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    url = f"http://127.0.0.1:{args.port}"
    proc = start_server(args.port, serve_args)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1200, "height": 760})
            expect.set_options(timeout=120_000)
            page.goto(url + "/")
            page.fill("#system", "You are a concise assistant. Use Markdown.")
            page.fill("#temperature", "0.2")
            page.fill("#max-tokens", "200")
            page.fill("#input", "What is a KV cache, and why does paging it help? Give a short list.")
            page.press("#input", "Enter")
            page.wait_for_selector(".msg.assistant.done", timeout=120_000)
            page.screenshot(path=str(out / "chat.png"))

            page.goto(url + "/dashboard")
            page.wait_for_selector("body[data-frames]")

            def ask(i: int) -> None:
                httpx.post(url + "/v1/completions", timeout=300, json={
                    "prompt": SHARED_PREFIX + f"Question {i}: why is the sky blue?", "max_tokens": 96, "ignore_eos": True,
                    "temperature": 0.7, "n": 2 if i % 3 == 0 else 1,
                })

            threads = [threading.Thread(target=ask, args=(i,)) for i in range(10)]
            for i, thread in enumerate(threads):
                thread.start()
                time.sleep(1.0 if i == 0 else 0.1)  # the first computes the shared prefix; the others reuse it
            expect(page.locator("#count-shared")).not_to_have_text("0")
            time.sleep(2)  # a few seconds of steps and latencies on the charts
            page.screenshot(path=str(out / "dashboard.png"), full_page=True)
            for thread in threads:
                thread.join(300)
            browser.close()
    finally:
        proc.terminate()
        proc.wait(30)


if __name__ == "__main__":
    main()
