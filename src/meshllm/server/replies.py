"""Replies built from a generation's text deltas: the whole text at once, or the payloads of a stream."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable

from meshllm.server.errors import SERVER_ERROR, error_body, pipeline_failed, unavailable
from meshllm.server.generation import Generation, TextDelta
from meshllm.server.protocol import (
    ChatCompletionChunk,
    ChatCompletionStreamChoice,
    CompletionChoice,
    CompletionResponse,
    DeltaMessage,
    UsageInfo,
)
from meshllm.step import FinishReason, PipelineError

log = logging.getLogger(__name__)


def usage_of(generation: Generation) -> UsageInfo:
    prompt, completion = generation.prompt_tokens, generation.completion_tokens
    return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


async def collect(generation: Generation) -> tuple[str, FinishReason]:
    """The whole reply of a non-streamed request; a pipeline failure is a 503."""
    parts: list[str] = []
    finish_reason: FinishReason = "stop"
    try:
        async for delta in generation.deltas():
            parts.append(delta.text)
            finish_reason = delta.finish_reason or finish_reason
    except PipelineError as error:
        raise unavailable(str(error)) from None
    return "".join(parts), finish_reason


async def _stream(
    generation: Generation,
    first: Callable[[], str] | None,
    piece: Callable[[TextDelta], list[str]],
    usage_chunk: Callable[[], str] | None,
) -> AsyncIterator[str]:
    """The payloads of a stream: `first`, a few per delta, then usage; an error event if the pipeline fails."""
    try:
        if first is not None:
            yield first()
        async for delta in generation.deltas():
            for payload in piece(delta):
                yield payload
        if usage_chunk is not None:
            yield usage_chunk()
    except PipelineError as error:
        log.warning("sequence %s failed mid-stream: %s", generation.seq_id, error)
        yield json.dumps(pipeline_failed(str(error)))
    except Exception as error:  # a bug must still end the stream with an error, not a cut connection
        log.exception("sequence %s: unexpected error mid-stream", generation.seq_id)
        message = f"internal error: {type(error).__name__}: {error}".splitlines()[0]
        yield json.dumps(error_body(message, SERVER_ERROR, None, "internal_error"))
    finally:
        generation.close()


def chat_chunks(
    generation: Generation,
    request_id: str,
    created: int,
    model: str,
    include_usage: bool,
    continuous_usage: bool,
) -> AsyncIterator[str]:
    # With include_usage every chunk carries "usage": null and a last chunk with no choices the totals.
    exclude = None if include_usage or continuous_usage else {"usage"}

    def chunk(
        delta: DeltaMessage, finish_reason: FinishReason | None = None, usage: UsageInfo | None = None
    ) -> str:
        choice = ChatCompletionStreamChoice(delta=delta, finish_reason=finish_reason)
        if continuous_usage and usage is None:
            usage = usage_of(generation)
        body = ChatCompletionChunk(id=request_id, created=created, model=model, choices=[choice], usage=usage)
        return body.model_dump_json(exclude=exclude)

    def piece(delta: TextDelta) -> list[str]:
        payloads = [chunk(DeltaMessage(content=delta.text))] if delta.text else []
        if delta.finish_reason:
            payloads.append(chunk(DeltaMessage(), delta.finish_reason))
        return payloads

    def usage_chunk() -> str:
        body = ChatCompletionChunk(
            id=request_id, created=created, model=model, choices=[], usage=usage_of(generation)
        )
        return body.model_dump_json()

    return _stream(
        generation,
        lambda: chunk(DeltaMessage(role="assistant", content="")),
        piece,
        usage_chunk if include_usage else None,
    )


def completion_chunks(
    generation: Generation,
    request_id: str,
    created: int,
    model: str,
    include_usage: bool,
    continuous_usage: bool,
) -> AsyncIterator[str]:
    exclude = None if include_usage or continuous_usage else {"usage"}

    def chunk(text: str, finish_reason: FinishReason | None = None, usage: UsageInfo | None = None) -> str:
        choice = CompletionChoice(text=text, finish_reason=finish_reason)
        if continuous_usage and usage is None:
            usage = usage_of(generation)
        body = CompletionResponse(id=request_id, created=created, model=model, choices=[choice], usage=usage)
        return body.model_dump_json(exclude=exclude)

    def piece(delta: TextDelta) -> list[str]:
        payloads = [chunk(delta.text)] if delta.text else []
        if delta.finish_reason:
            payloads.append(chunk("", delta.finish_reason))
        return payloads

    def usage_chunk() -> str:
        body = CompletionResponse(
            id=request_id, created=created, model=model, choices=[], usage=usage_of(generation)
        )
        return body.model_dump_json()

    return _stream(generation, None, piece, usage_chunk if include_usage else None)
