"""The Anthropic Messages API (`POST /v1/messages`): its request and reply shapes, its checks, its errors.

A messages request becomes the same `ValidRequest` a chat request does (the system prompt first, then
the conversation, rendered by the chat template), so it runs the server's one generation path; only the
spelling of the reply differs: one `message` object, or the stream of named SSE events
(`message_start`, `content_block_start`, `ping`, `content_block_delta`, `content_block_stop`,
`message_delta`, `message_stop`). Errors are `{"type": "error", "error": {"type", "message"}}`.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue

from meshllm.runtime.engine_client import ServedModel
from meshllm.server.errors import APIError, invalid, unavailable, unsupported
from meshllm.server.generation import TextDelta
from meshllm.server.validation import ChatPrompt, StreamShape, ValidRequest, check_model, stop_strings
from meshllm.step import FinishReason, PipelineError, SamplingParams

log = logging.getLogger(__name__)

MESSAGES_PATH = "/v1/messages"

# ---------------------------------------------------------------------------------------------- requests


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class ContentBlock(BaseModel):
    """One block of a message's content; only `{"type": "text", "text": ...}` is served. Other keys of a
    text block (`cache_control`, `citations`) are ignored."""

    model_config = ConfigDict(extra="allow", strict=True)
    type: str
    text: str | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["user", "assistant"]
    content: str | list[ContentBlock]


class MessagesRequest(_Request):
    model: str
    messages: list[Message]
    max_tokens: int = Field(ge=1)
    system: str | list[ContentBlock] | None = None
    stop_sequences: list[str] | None = None
    stream: bool = False
    temperature: float | None = Field(default=None, ge=0.0, le=1.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)  # 0: no top-k cut
    seed: int | None = None  # extension (as on chat): the same seed gives the same tokens
    # Accepted and ignored: hints with no effect on a self-hosted model (no prompt cache, one speed).
    metadata: dict[str, JsonValue] | None = None
    service_tier: str | None = None
    cache_control: dict[str, JsonValue] | None = None
    diagnostics: dict[str, JsonValue] | None = None
    inference_geo: str | None = None
    speed: str | None = None
    user_profile_id: str | None = None
    workspace_id: str | None = None
    output_config: dict[str, JsonValue] | None = None  # its `effort` is ignored, a `format` refused
    # Refused (400 naming the field) unless absent or neutral.
    tools: list[dict[str, JsonValue]] | None = None
    tool_choice: dict[str, JsonValue] | None = None
    thinking: dict[str, JsonValue] | None = None
    mcp_servers: list[dict[str, JsonValue]] | None = None
    container: JsonValue = None
    context_management: dict[str, JsonValue] | None = None


class CountTokensRequest(_Request):
    """`POST /v1/messages/count_tokens`: the prompt of a messages request, without generating."""

    model: str
    messages: list[Message]
    system: str | list[ContentBlock] | None = None
    tools: list[dict[str, JsonValue]] | None = None
    tool_choice: dict[str, JsonValue] | None = None
    thinking: dict[str, JsonValue] | None = None
    mcp_servers: list[dict[str, JsonValue]] | None = None
    context_management: dict[str, JsonValue] | None = None


# --------------------------------------------------------------------------------------------- responses

StopReason = Literal["end_turn", "max_tokens", "stop_sequence"]


class TextBlock(BaseModel):
    type: Literal["text"] = "text"
    text: str


class Usage(BaseModel):
    input_tokens: int  # the prompt after the chat template
    output_tokens: int


class MessageResponse(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    content: list[TextBlock]
    model: str
    stop_reason: StopReason | None
    stop_sequence: str | None
    usage: Usage


class TokenCount(BaseModel):
    input_tokens: int


# ------------------------------------------------------------------------------------------- validation


def validate_messages(request: MessagesRequest, served: str, model: ServedModel) -> ValidRequest:
    """The request as the generation path takes it; a 400 naming the field for what is not served."""
    prompt = messages_prompt(request, served)
    sampling = SamplingParams(
        temperature=1.0 if request.temperature is None else request.temperature,
        top_p=1.0 if request.top_p is None else request.top_p,
        top_k=request.top_k or 0,
        seed=None if request.seed is None else request.seed % 2**64,
    )
    return ValidRequest(
        prompt=prompt,
        prompt_field="messages",
        max_tokens=request.max_tokens,
        max_tokens_field="max_tokens",
        default_max_tokens=None,
        sampling=sampling,
        ignore_eos=False,
        stop_token_ids=(),
        stop=stop_strings(request.stop_sequences, "stop_sequences"),
        skip_special_tokens=True,
        stream=StreamShape() if request.stream else None,
    )


def messages_prompt(request: MessagesRequest | CountTokensRequest, served: str) -> ChatPrompt:
    """The conversation for the chat template: the system prompt first, then the messages."""
    check_model(request.model, served)
    refuse_unsupported(request)
    if not request.messages:
        raise invalid("messages: at least one message is required", "messages")
    rendered: list[dict[str, str]] = []
    if request.system is not None:
        system = request.system if isinstance(request.system, str) else _text(request.system, "system")
        rendered.append({"role": "system", "content": system})
    for index, message in enumerate(request.messages):
        param = f"messages[{index}]"
        content = message.content
        text = content if isinstance(content, str) else _text(content, f"{param}.content")
        rendered.append({"role": message.role, "content": text})
    continuation = ""
    if request.messages[-1].role == "assistant":  # a prefill: the reply continues this text
        continuation = rendered.pop()["content"]
        if continuation != continuation.rstrip():
            last = len(request.messages) - 1
            raise invalid(
                f"messages[{last}]: final assistant content cannot end with trailing whitespace",
                f"messages[{last}].content",
            )
    return ChatPrompt(rendered, {}, continuation)


def refuse_unsupported(request: MessagesRequest | CountTokensRequest) -> None:
    if request.tools:
        raise unsupported("tools", "tools: tool use is not supported by this server")
    choice = request.tool_choice
    if choice is not None and choice.get("type") not in ("auto", "none"):
        raise unsupported("tool_choice", "tool_choice: tool use is not supported by this server")
    if request.thinking is not None and request.thinking.get("type") != "disabled":
        raise unsupported("thinking", "thinking: extended thinking is not supported by this server")
    if request.mcp_servers:
        raise unsupported("mcp_servers", "mcp_servers: MCP servers are not supported by this server")
    if request.context_management is not None:
        raise unsupported("context_management", "context_management is not supported by this server")
    if isinstance(request, MessagesRequest):
        if request.container is not None:
            raise unsupported("container", "container: code execution is not supported by this server")
        if request.output_config and request.output_config.get("format") is not None:
            raise unsupported(
                "output_config.format",
                "output_config.format: structured output is not supported by this server",
            )


def _text(blocks: list[ContentBlock], param: str) -> str:
    """Text blocks joined with newlines; any other kind of block is a 400 naming it."""
    texts = []
    for index, block in enumerate(blocks):
        if block.type != "text":
            raise unsupported(
                f"{param}[{index}]",
                f"{param}[{index}]: content of type '{block.type}' is not supported (text only)",
            )
        if block.text is None:
            raise invalid(f"{param}[{index}]: a text block needs its 'text'", f"{param}[{index}].text")
        texts.append(block.text)
    return "\n".join(texts)


# ----------------------------------------------------------------------------------------------- replies


def stop_reason(finish_reason: FinishReason | None, stop_string: str | None) -> StopReason:
    if stop_string is not None:
        return "stop_sequence"
    return "max_tokens" if finish_reason == "length" else "end_turn"


def message_id() -> str:
    return f"msg_{uuid.uuid4().hex}"


async def whole_message(model: str, deltas: AsyncIterator[TextDelta], input_tokens: int) -> MessageResponse:
    """The reply of a request that is not streamed; a pipeline failure is a 503."""
    parts: list[str] = []
    last: TextDelta | None = None
    try:
        async for delta in deltas:
            parts.append(delta.text)
            last = delta
    except PipelineError as error:
        raise unavailable(str(error)) from None
    finish_reason = last.finish_reason if last else None
    stop_string = last.stop_string if last else None
    return MessageResponse(
        id=message_id(),
        content=[TextBlock(text="".join(parts))],
        model=model,
        stop_reason=stop_reason(finish_reason, stop_string),
        stop_sequence=stop_string,
        usage=Usage(input_tokens=input_tokens, output_tokens=last.completion_tokens if last else 0),
    )


def sse_event(payload: dict[str, object] | BaseModel) -> str:
    """One named SSE event: `event: <type>` and its JSON, whose `type` is the same name."""
    data = payload.model_dump(mode="json") if isinstance(payload, BaseModel) else payload
    return f"event: {data['type']}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


async def message_events(
    model: str, deltas: AsyncIterator[TextDelta], input_tokens: int
) -> AsyncIterator[str]:
    """The SSE events of a streamed reply, in Anthropic's order. Made once the first token came; a
    failure after that ends the stream with an `error` event instead of `message_stop`."""
    output_tokens = 1  # the first token is there when the stream starts
    try:
        opening = MessageResponse(
            id=message_id(),
            content=[],
            model=model,
            stop_reason=None,
            stop_sequence=None,
            usage=Usage(input_tokens=input_tokens, output_tokens=output_tokens),
        )
        yield sse_event({"type": "message_start", "message": opening.model_dump(mode="json")})
        yield sse_event(
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
        )
        yield sse_event({"type": "ping"})
        finish: TextDelta | None = None
        async for delta in deltas:
            output_tokens = delta.completion_tokens
            if delta.text:
                text_delta = {"type": "text_delta", "text": delta.text}
                yield sse_event({"type": "content_block_delta", "index": 0, "delta": text_delta})
            if delta.finish_reason:
                finish = delta
        yield sse_event({"type": "content_block_stop", "index": 0})
        reason = stop_reason(finish.finish_reason if finish else None, finish.stop_string if finish else None)
        yield sse_event(
            {
                "type": "message_delta",
                "delta": {"stop_reason": reason, "stop_sequence": finish.stop_string if finish else None},
                "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens},
            }
        )
        yield sse_event({"type": "message_stop"})
    except PipelineError as error:
        yield sse_event(error_body(str(error), "overloaded_error"))
    except Exception as error:  # a bug must still end the stream with an error, not a cut connection
        log.exception("unexpected error mid-stream")
        yield sse_event(
            error_body(f"internal error: {type(error).__name__}: {error}".splitlines()[0], "api_error")
        )


class MessageStream:
    """A streamed messages reply: complete SSE events, and `close()` (safe to call twice)."""

    def __init__(self, events: AsyncIterator[str], close: Callable[[], None]) -> None:
        self._events = events
        self._close = close

    def __aiter__(self) -> AsyncIterator[str]:
        return self._events

    def close(self) -> None:
        self._close()


# ------------------------------------------------------------------------------------------------ errors

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


class MessagesErrorDetail(BaseModel):
    type: str  # invalid_request_error, authentication_error, not_found_error, overloaded_error, api_error
    message: str


class MessagesErrorResponse(BaseModel):
    """Anthropic's error body, as the OpenAPI document lists it."""

    type: Literal["error"] = "error"
    error: MessagesErrorDetail


def error_body(message: str, type: str) -> dict[str, object]:
    return {"type": "error", "error": {"type": type, "message": message}}


def error_type(status: int) -> str:
    return ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")


def api_error_body(error: APIError) -> dict[str, object]:
    """An `APIError` of the request path in Anthropic's shape (its message names the field at fault)."""
    return error_body(error.message, error_type(error.status))


def is_messages_path(path: str) -> bool:
    return path == MESSAGES_PATH or path.startswith(MESSAGES_PATH + "/")
