"""Replies made from a sequence's text deltas: one whole reply, or the payloads of a stream.

The shape both endpoints share is written once here (`whole_reply`, `stream_payloads`): the opening
chunk, a chunk per piece of text, the chunk that carries the finish reason, usage, and the error event
that ends a stream whose pipeline failed. What differs is a small `ReplyFormat` per endpoint:
`ChatReply` (`chat.completion`, deltas with a role chunk first) and `CompletionReply` (`text_completion`).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from typing import ClassVar, Generic, TypeVar

from pydantic import BaseModel

from meshllm.server.errors import SERVER_ERROR, error_body, pipeline_failed, unavailable
from meshllm.server.generation import TextDelta
from meshllm.server.protocol import (
    AssistantMessage,
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatCompletionStreamChoice,
    CompletionChoice,
    CompletionResponse,
    DeltaMessage,
    UsageInfo,
)
from meshllm.server.validation import StreamShape
from meshllm.step import FinishReason, PipelineError

log = logging.getLogger(__name__)

ChoiceT = TypeVar("ChoiceT", ChatCompletionStreamChoice, CompletionChoice)


def usage(prompt_tokens: int, completion_tokens: int) -> UsageInfo:
    return UsageInfo(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )


class ReplyFormat(ABC, Generic[ChoiceT]):
    """How one endpoint spells its replies. Made when the sequence has its first token."""

    id_prefix: ClassVar[str]

    def __init__(self, model: str) -> None:
        self.id = f"{self.id_prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model

    def opening(self) -> ChoiceT | None:
        """The choice of the stream's first chunk, before any text; None: the stream starts with text."""
        return None

    @abstractmethod
    def piece(self, text: str, finish_reason: FinishReason | None = None) -> ChoiceT:
        """The choice of a chunk: some text, or (text "") the one that carries the finish reason."""

    @abstractmethod
    def chunk(self, choices: list[ChoiceT], usage: UsageInfo | None) -> BaseModel:
        """A stream chunk; without choices, the usage chunk at the end."""

    @abstractmethod
    def whole(self, text: str, finish_reason: FinishReason, usage: UsageInfo) -> BaseModel:
        """The reply of a request that is not streamed."""


class ChatReply(ReplyFormat[ChatCompletionStreamChoice]):
    id_prefix = "chatcmpl"

    def opening(self) -> ChatCompletionStreamChoice:
        return ChatCompletionStreamChoice(delta=DeltaMessage(role="assistant", content=""))

    def piece(self, text: str, finish_reason: FinishReason | None = None) -> ChatCompletionStreamChoice:
        return ChatCompletionStreamChoice(
            delta=DeltaMessage(content=text or None), finish_reason=finish_reason
        )

    def chunk(self, choices: list[ChatCompletionStreamChoice], usage: UsageInfo | None) -> BaseModel:
        return ChatCompletionChunk(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=usage
        )

    def whole(self, text: str, finish_reason: FinishReason, usage: UsageInfo) -> BaseModel:
        choice = ChatCompletionChoice(message=AssistantMessage(content=text), finish_reason=finish_reason)
        return ChatCompletionResponse(
            id=self.id, created=self.created, model=self.model, choices=[choice], usage=usage
        )


class CompletionReply(ReplyFormat[CompletionChoice]):
    id_prefix = "cmpl"

    def piece(self, text: str, finish_reason: FinishReason | None = None) -> CompletionChoice:
        return CompletionChoice(text=text, finish_reason=finish_reason)

    def chunk(self, choices: list[CompletionChoice], usage: UsageInfo | None) -> BaseModel:
        return CompletionResponse(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=usage
        )

    def whole(self, text: str, finish_reason: FinishReason, usage: UsageInfo) -> BaseModel:
        return self.chunk([self.piece(text, finish_reason)], usage)


# ----------------------------------------------------------------------------------------- the shape


async def whole_reply(
    reply: ReplyFormat[ChoiceT], deltas: AsyncIterator[TextDelta], prompt_tokens: int
) -> BaseModel:
    """The reply of a request that is not streamed: every delta's text; a pipeline failure is a 503."""
    parts: list[str] = []
    finish_reason: FinishReason = "stop"
    completion_tokens = 0
    try:
        async for delta in deltas:
            parts.append(delta.text)
            finish_reason = delta.finish_reason or finish_reason
            completion_tokens = delta.completion_tokens
    except PipelineError as error:
        raise unavailable(str(error)) from None
    return reply.whole("".join(parts), finish_reason, usage(prompt_tokens, completion_tokens))


async def stream_payloads(
    reply: ReplyFormat[ChoiceT], deltas: AsyncIterator[TextDelta], prompt_tokens: int, shape: StreamShape
) -> AsyncIterator[str]:
    """The JSON payloads of a stream's `data:` events (without the final `[DONE]`), in order: the
    opening chunk, a chunk per piece of text, the chunk with the finish reason, and with `include_usage`
    a last chunk with the totals. A failure ends the stream with an error event instead."""
    # With usage asked for, every chunk carries "usage" (null, or so far); otherwise none has the key.
    exclude = None if shape.include_usage or shape.continuous_usage else {"usage"}
    completion_tokens = 0

    def chunk(choice: ChoiceT) -> str:
        so_far = usage(prompt_tokens, completion_tokens) if shape.continuous_usage else None
        return reply.chunk([choice], so_far).model_dump_json(exclude=exclude)

    try:
        opening = reply.opening()
        if opening is not None:
            yield chunk(opening)
        async for delta in deltas:
            completion_tokens = delta.completion_tokens
            if delta.text:
                yield chunk(reply.piece(delta.text))
            if delta.finish_reason:
                yield chunk(reply.piece("", delta.finish_reason))
        if shape.include_usage:
            yield reply.chunk([], usage(prompt_tokens, completion_tokens)).model_dump_json()
    except PipelineError as error:
        yield json.dumps(pipeline_failed(str(error)))
    except Exception as error:  # a bug must still end the stream with an error, not a cut connection
        log.exception("unexpected error mid-stream")
        message = f"internal error: {type(error).__name__}: {error}".splitlines()[0]
        yield json.dumps(error_body(message, SERVER_ERROR, None, "internal_error"))


class EventStream:
    """A streamed reply: JSON payloads for `data:` events (without the final `[DONE]`), and `close()`."""

    def __init__(self, payloads: AsyncIterator[str], close: Callable[[], None]) -> None:
        self._payloads = payloads
        self._close = close

    def __aiter__(self) -> AsyncIterator[str]:
        return self._payloads

    def close(self) -> None:
        """Ends the sequence if it is still running (the client went away); safe to call twice."""
        self._close()
