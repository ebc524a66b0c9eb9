"""Replies made from text deltas (`server/replies.py`), fed a fake stream of deltas: the order and shape
of stream chunks, usage, the error event, and whole replies equal to their streams."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from meshllm.server.errors import APIError
from meshllm.server.generation import TextDelta
from meshllm.server.replies import ChatReply, CompletionReply, ReplyFormat, stream_payloads, whole_reply
from meshllm.server.validation import StreamShape
from meshllm.step import PipelineError

PROMPT_TOKENS = 9
DELTAS = [TextDelta("Hel", 2), TextDelta("lo", 3), TextDelta("!", 5, "stop")]


async def play(deltas: list[TextDelta], error: BaseException | None = None) -> AsyncIterator[TextDelta]:
    for delta in deltas:
        yield delta
    if error is not None:
        raise error


def stream(
    reply: ReplyFormat, shape: StreamShape = StreamShape(), deltas=DELTAS, error=None
) -> list[dict[str, Any]]:
    async def main() -> list[str]:
        return [
            payload async for payload in stream_payloads(reply, play(deltas, error), PROMPT_TOKENS, shape)
        ]

    return [json.loads(payload) for payload in asyncio.run(main())]


def whole(reply: ReplyFormat, deltas=DELTAS, error=None) -> dict[str, Any]:
    return asyncio.run(whole_reply(reply, play(deltas, error), PROMPT_TOKENS)).model_dump(mode="json")


def test_a_chat_stream_opens_with_the_role_then_text_then_the_finish_reason() -> None:
    chunks = stream(ChatReply("demo"))
    assert [chunk["choices"][0]["delta"] for chunk in chunks] == [
        {"role": "assistant", "content": ""},
        {"content": "Hel"},
        {"content": "lo"},
        {"content": "!"},
        {},
    ]
    assert [chunk["choices"][0]["finish_reason"] for chunk in chunks] == [None] * 4 + ["stop"]
    assert all(chunk["object"] == "chat.completion.chunk" and chunk["model"] == "demo" for chunk in chunks)
    assert len({chunk["id"] for chunk in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert all("usage" not in chunk for chunk in chunks)


def test_a_completion_stream_has_no_opening_chunk_and_ends_with_an_empty_text() -> None:
    chunks = stream(CompletionReply("demo"))
    assert [(chunk["choices"][0]["text"], chunk["choices"][0]["finish_reason"]) for chunk in chunks] == [
        ("Hel", None),
        ("lo", None),
        ("!", None),
        ("", "stop"),
    ]
    assert all(chunk["object"] == "text_completion" and chunk["id"].startswith("cmpl-") for chunk in chunks)


def test_include_usage_puts_null_usage_on_every_chunk_and_the_totals_last() -> None:
    chunks = stream(ChatReply("demo"), StreamShape(include_usage=True))
    assert all(chunk["usage"] is None for chunk in chunks[:-1])
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 9, "completion_tokens": 5, "total_tokens": 14}


def test_continuous_usage_reports_the_tokens_so_far_on_every_chunk() -> None:
    chunks = stream(CompletionReply("demo"), StreamShape(continuous_usage=True))
    assert [chunk["usage"]["completion_tokens"] for chunk in chunks] == [2, 3, 5, 5]
    assert stream(ChatReply("demo"), StreamShape(continuous_usage=True))[0]["usage"]["completion_tokens"] == 0


def test_a_delta_without_text_makes_no_chunk() -> None:
    deltas = [TextDelta("a", 1), TextDelta("", 4, "length")]
    assert [chunk["choices"][0]["text"] for chunk in stream(CompletionReply("demo"), deltas=deltas)] == [
        "a",
        "",
    ]


def test_a_pipeline_failure_mid_stream_ends_it_with_an_error_event() -> None:
    error = PipelineError("device 'worker1' (127.0.0.1:50051) is unreachable")
    chunks = stream(ChatReply("demo"), StreamShape(include_usage=True), DELTAS[:2], error)
    assert [chunk["choices"][0]["delta"].get("content") for chunk in chunks[:-1]] == ["", "Hel", "lo"]
    assert chunks[-1] == {
        "error": {
            "message": "device 'worker1' (127.0.0.1:50051) is unreachable",
            "type": "server_error",
            "param": None,
            "code": "pipeline_error",
        }
    }


def test_a_bug_mid_stream_ends_it_with_an_internal_error_event() -> None:
    chunks = stream(CompletionReply("demo"), deltas=DELTAS[:1], error=KeyError("oops"))
    assert chunks[-1]["error"]["code"] == "internal_error"
    assert chunks[-1]["error"]["message"].startswith("internal error: KeyError")


@pytest.mark.parametrize("reply", [ChatReply, CompletionReply])
def test_a_whole_reply_is_its_stream_put_together(reply) -> None:
    body = whole(reply("demo"))
    chunks = stream(reply("demo"), StreamShape(include_usage=True))
    choice = body["choices"][0]
    if reply is ChatReply:
        assert body["object"] == "chat.completion"
        text = choice["message"]["content"]
        streamed = "".join(chunk["choices"][0]["delta"].get("content", "") for chunk in chunks[:-1])
    else:
        assert body["object"] == "text_completion"
        text = choice["text"]
        streamed = "".join(chunk["choices"][0]["text"] for chunk in chunks[:-1])
    assert text == streamed == "Hello!"
    assert choice["finish_reason"] == "stop"
    assert (
        body["usage"]
        == chunks[-1]["usage"]
        == {"prompt_tokens": 9, "completion_tokens": 5, "total_tokens": 14}
    )


def test_a_pipeline_failure_before_a_whole_reply_is_a_503() -> None:
    with pytest.raises(APIError) as caught:
        whole(ChatReply("demo"), DELTAS[:1], PipelineError("device 'worker1' is unreachable"))
    assert caught.value.status == 503 and "worker1" in caught.value.message
