"""Checks of a request beyond its types: features refused with a 400 naming the field, and the messages
as the chat template expects them."""

from __future__ import annotations

from typing import Any

from meshllm.server.errors import invalid, unsupported
from meshllm.server.protocol import ChatCompletionRequest, ChatMessage, CompletionRequest


def refuse_unsupported_common(request: ChatCompletionRequest | CompletionRequest) -> None:
    if request.n not in (None, 1):
        raise unsupported("n", "only n=1 is supported; send several requests for several replies")
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(request, name) not in (None, 0):
            raise unsupported(name, f"{name} is not supported; leave it out or set it to 0")
    if request.logit_bias:
        raise unsupported("logit_bias")
    if request.stream_options is not None and not request.stream:
        raise invalid("stream_options is only allowed when stream is true", "stream_options")


def refuse_unsupported_chat(request: ChatCompletionRequest) -> None:
    refuse_unsupported_common(request)
    if request.logprobs:
        raise unsupported("logprobs", "logprobs are not supported by this server")
    if request.top_logprobs:
        raise unsupported("top_logprobs", "logprobs are not supported by this server")
    if request.tools:
        raise unsupported("tools", "tools (function calling) are not supported by this server")
    if request.tool_choice not in (None, "none", "auto"):
        raise unsupported("tool_choice", "tools (function calling) are not supported by this server")
    if request.functions or request.function_call not in (None, "none", "auto"):
        name = "functions" if request.functions else "function_call"
        raise unsupported(name, "functions (function calling) are not supported by this server")
    if request.response_format and request.response_format.get("type", "text") != "text":
        raise unsupported("response_format", 'only response_format {"type": "text"} is supported')
    if request.modalities not in (None, ["text"]):
        raise unsupported("modalities", "only text output is supported")
    for name in ("audio", "prediction", "web_search_options"):
        if getattr(request, name) is not None:
            raise unsupported(name)


def refuse_unsupported_completion(request: CompletionRequest) -> None:
    refuse_unsupported_common(request)
    if request.logprobs:
        raise unsupported("logprobs", "logprobs are not supported by this server")
    if request.echo:
        raise unsupported("echo")
    if request.best_of not in (None, 1):
        raise unsupported("best_of", "only best_of=1 is supported")
    if request.suffix:
        raise unsupported("suffix")


def template_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """The messages as the chat template expects them: role and text content (plus name, reasoning)."""
    if not messages:
        raise invalid("messages must contain at least one message", "messages")
    rendered = []
    for index, message in enumerate(messages):
        param = f"messages[{index}]"
        if message.role in ("tool", "function"):
            raise unsupported(
                f"{param}.role", f"{param}: {message.role} messages are not supported (no tools)"
            )
        if message.tool_calls:
            raise unsupported(f"{param}.tool_calls", f"{param}: tool calls are not supported (no tools)")
        content = _text_content(message, param)
        entry: dict[str, Any] = {
            "role": "system" if message.role == "developer" else message.role,
            "content": content,
        }
        if message.name:
            entry["name"] = message.name
        if message.reasoning_content:
            entry["reasoning_content"] = message.reasoning_content
        rendered.append(entry)
    return rendered


def _text_content(message: ChatMessage, param: str) -> str:
    if message.content is None:
        if message.role == "assistant":
            return ""
        raise invalid(f"{param}.content is required for a {message.role} message", f"{param}.content")
    if isinstance(message.content, str):
        return message.content
    texts = []
    for index, part in enumerate(message.content):
        if part.type != "text" or part.text is None:
            raise unsupported(
                f"{param}.content[{index}]",
                f"{param}.content[{index}]: content of type '{part.type}' is not supported (text only)",
            )
        texts.append(part.text)
    return "\n".join(texts)


def stop_strings(stop: str | list[str] | None) -> tuple[str, ...]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if any(not item for item in stops):
        raise invalid("stop strings must not be empty", "stop")
    return tuple(stops)
