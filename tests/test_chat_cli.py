"""`kvserve chat` on a terminal, driven through a pseudo-terminal: history, Ctrl-C during a reply, /reset, /save."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

pexpect = pytest.importorskip("pexpect")

PROMPT = ">>>"  # prompt_toolkit draws ">>> " as ">>>" and a cursor move


def spawn_chat(model: Path, *flags: str) -> "pexpect.spawn":
    env = {**os.environ, "PROMPT_TOOLKIT_NO_CPR": "1", "TERM": "xterm", "KVSERVE_ALLOW_LONG_MAX_MODEL_LEN": "1"}
    child = pexpect.spawn(sys.executable, ["-m", "kvserve.entrypoints.cli", "chat", "-m", str(model), "--dtype", "float32",
                                           "-np", "1", "--ignore-eos", *flags],
                          env=env, encoding="utf-8", timeout=60, dimensions=(24, 200))
    child.expect("max tokens")  # the defaults are shown at start
    child.expect(PROMPT)
    return child


def saved(child: "pexpect.spawn", path: Path) -> list[dict[str, str]]:
    child.sendline(f"/save {path}")
    child.expect(r"\[saved \d+ messages")
    child.expect(PROMPT)
    return json.loads(path.read_text())


def close(child: "pexpect.spawn") -> None:
    child.sendeof()  # Ctrl-D exits
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_history_recall_cut_notice_and_reset(chat_llama, tmp_path):
    child = spawn_chat(chat_llama, "--max-tokens", "3")
    try:
        child.sendline("/help")
        child.expect("/reset")
        child.expect(PROMPT)
        child.sendline("what is a fox")
        child.expect(r"\[cut at the reply limit of 3 tokens")
        child.expect(PROMPT)
        child.send("\x1b[A")  # up arrow: the last line comes back, and Enter sends it again
        child.expect("what is a fox")
        child.send("\r")
        child.expect(r"\[cut at the reply limit")
        child.expect(PROMPT)
        conversation = saved(child, tmp_path / "chat.json")
        assert [m["role"] for m in conversation] == ["user", "assistant", "user", "assistant"]
        assert conversation[0]["content"] == conversation[2]["content"] == "what is a fox"
        child.sendline("/reset")
        child.expect(r"Forget the conversation \(4 messages\)\? \[y/N\]")
        child.sendline("n")
        child.expect(r"\[kept the conversation\]")
        child.expect(PROMPT)
        assert len(saved(child, tmp_path / "kept.json")) == 4
        child.sendline("/reset")
        child.expect(r"\[y/N\]")
        child.sendline("y")
        child.expect(r"\[new conversation\]")
        child.expect(PROMPT)
        child.sendline("/system Be brief.")
        child.expect(r"\[system message set\]")
        child.expect(PROMPT)
        assert saved(child, tmp_path / "reset.json") == [{"role": "system", "content": "Be brief."}]
        close(child)
    finally:
        child.terminate(force=True)


def test_ctrl_c_stops_the_reply_and_keeps_the_conversation(chat_llama, tmp_path):
    child = spawn_chat(chat_llama, "--max-tokens", "20000", "-c", "20000")  # a reply far longer than the test
    try:
        child.sendline("tell me everything")
        child.expect("tell me everything")  # the line is sent; the reply streams
        time.sleep(1.0)
        child.sendintr()
        child.expect(r"\[stopped: the conversation keeps the reply so far\]")
        child.expect(PROMPT)
        first = saved(child, tmp_path / "one.json")
        assert [m["role"] for m in first] == ["user", "assistant"] and first[1]["content"]
        child.sendline("/exit")
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 0  # Ctrl-C ended the reply, not the program
    finally:
        child.terminate(force=True)
