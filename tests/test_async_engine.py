"""RequestStream: outputs a reader has not taken are merged, so a reader that stops holds one output, not one per step."""

from __future__ import annotations

import asyncio

import pytest

from kvserve.engine.async_engine import RequestStream
from kvserve.engine.llm_engine import EngineDeadError
from kvserve.outputs import CompletionOutput, RequestOutput


def _step_output(i: int, finished: bool = False) -> RequestOutput:
    """Step i of a request with two outputs, each adding one token and one character."""
    completions = [CompletionOutput(k, "ab"[k] * (i + 1), list(range(i + 1))) for k in range(2)]
    return RequestOutput("r", None, [1, 2], completions, finished, new_text=["a", "b"], new_token_ids=[[i], [i]])


def test_unread_outputs_merge_into_one_that_carries_every_delta():
    async def main() -> None:
        stream = RequestStream("r", [1, 2])
        first = _step_output(0)
        stream.put(first)
        assert await anext(stream) is first
        for i in range(1, 1000):  # a reader that stops: 999 steps arrive unread
            stream.put(_step_output(i, finished=i == 999))
        merged = await anext(stream)
        assert merged.finished
        assert merged.new_text == ["a" * 999, "b" * 999]
        assert merged.new_token_ids == [list(range(1, 1000))] * 2
        assert merged.outputs[0].text == "a" * 1000  # cumulative fields are the newest output's
        with pytest.raises(StopAsyncIteration):
            await anext(stream)

    asyncio.run(main())


def test_an_error_ends_the_stream_and_nothing_follows_it():
    async def main() -> None:
        stream = RequestStream("r", [1, 2])
        stream.put(_step_output(0))
        stream.put(EngineDeadError("gone"))
        stream.put(_step_output(1))
        with pytest.raises(EngineDeadError):
            await anext(stream)
        with pytest.raises(StopAsyncIteration):
            await anext(stream)

    asyncio.run(main())


def test_the_shutdown_output_keeps_the_unread_deltas():
    async def main() -> None:
        stream = RequestStream("r", [1, 2])
        stream.put(_step_output(0))
        stream.put(_step_output(1))
        stream.put(stream.aborted_output())
        out = await anext(stream)
        assert out.finished and [c.finish_reason for c in out.outputs] == ["abort", "abort"]
        assert out.new_text == ["aa", "bb"] and out.outputs[1].text == "bb"

    asyncio.run(main())
