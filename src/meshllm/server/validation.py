"""Every check of a request beyond its types, and the sequence request that comes out of it.

Pure: no I/O and no engine, only the request and the served model. It runs in two steps around the
prompt's tokenization: `validate_chat` / `validate_completion` refuse what this server does not do
(a 400 naming the field), render the messages as the chat template expects them and check stop strings
and token ids; `ValidRequest.sequence(prompt_ids, model)` then checks the lengths against the context
and builds the `GenerateRequest`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import cast

from pydantic import JsonValue

from meshllm.runtime.engine_client import GenerateRequest, ServedModel
from meshllm.server.errors import invalid, model_not_found, unsupported
from meshllm.server.generation import SequenceRequest
from meshllm.server.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    StreamOptions,
)
from meshllm.step import SamplingParams

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
# Keys apply_chat_template sets itself; a client passing them in chat_template_kwargs would break it.
RESERVED_TEMPLATE_KWARGS = frozenset(
    {"conversation", "messages", "tokenize", "add_generation_prompt", "return_dict", "return_tensors"}
)


@dataclass(frozen=True)
class ChatPrompt:
    """A conversation for the chat template to render."""

    messages: list[dict[str, str]]  # role and text content (plus name, reasoning_content)
    template_kwargs: dict[str, JsonValue]
    # Text the reply continues (Anthropic's prefill: a last assistant message), tokenized after the
    # rendered prompt; the reply leaves it out.
    continuation: str = ""


# What becomes the prompt ids: a conversation to render, a text to tokenize, or the token ids themselves.
Prompt = ChatPrompt | str | list[int]


@dataclass(frozen=True)
class StreamShape:
    """How a streamed reply reports usage."""

    include_usage: bool = False  # a last chunk, without choices, with the totals
    continuous_usage: bool = False  # usage so far on every chunk


@dataclass(frozen=True)
class ValidRequest:
    """A request that passed every check that needs no prompt ids."""

    prompt: Prompt
    prompt_field: str  # the field a too-long prompt is blamed on: "messages" or "prompt"
    max_tokens: int | None  # None: the default, else all the context the prompt leaves
    max_tokens_field: str  # "max_tokens" or "max_completion_tokens"
    default_max_tokens: int | None
    sampling: SamplingParams  # without eos_token_ids: those come with the model
    ignore_eos: bool
    stop_token_ids: tuple[int, ...]
    stop: tuple[str, ...]
    skip_special_tokens: bool
    stream: StreamShape | None  # None: one whole reply

    def sequence(self, prompt_ids: list[int], model: ServedModel) -> SequenceRequest:
        """The sequence to generate after this prompt; a 400 naming the field when it cannot fit."""
        max_tokens = self._max_tokens(len(prompt_ids), model.max_context)
        min_tokens = self.sampling.min_tokens
        if min_tokens > max_tokens:
            raise invalid(
                f"min_tokens ({min_tokens}) is larger than {self.max_tokens_field} ({max_tokens})",
                "min_tokens",
            )
        # Stop tokens are banned along with eos until min_tokens tokens were sampled.
        sampling = replace(self.sampling, eos_token_ids=tuple(model.eos_token_ids) + self.stop_token_ids)
        generate = GenerateRequest(
            prompt_ids=prompt_ids,
            sampling=sampling,
            max_tokens=max_tokens,
            ignore_eos=self.ignore_eos,
            stop_token_ids=frozenset(self.stop_token_ids),
        )
        return SequenceRequest(generate, self.stop, self.skip_special_tokens)

    def _max_tokens(self, n_prompt: int, max_context: int) -> int:
        """The number of tokens to generate; a 400 naming the field when the context cannot hold them."""
        prompt_field, field = self.prompt_field, self.max_tokens_field
        if n_prompt == 0:
            raise invalid(f"{prompt_field} must not be empty", prompt_field)
        if n_prompt >= max_context:
            raise invalid(
                f"This model's maximum context length is {max_context} tokens, but {n_prompt} tokens are "
                f"in the {prompt_field}, leaving no room for a reply. Please shorten the {prompt_field}.",
                prompt_field,
                "context_length_exceeded",
            )
        room = max_context - n_prompt
        requested = self.max_tokens
        if requested is None:
            default = self.default_max_tokens
            return room if default is None else min(default, room)
        if n_prompt + requested > max_context:
            raise invalid(
                f"This model's maximum context length is {max_context} tokens. However, you requested "
                f"{n_prompt + requested} tokens ({n_prompt} in the {prompt_field}, {requested} in the "
                f"completion). Please reduce the length of the {prompt_field} or {field} (at most {room}).",
                field,
                "context_length_exceeded",
            )
        return requested


# ------------------------------------------------------------------------------------------ endpoints


def check_model(requested: str | None, served: str) -> None:
    """404 for another model than the served one (leaving it out means the served one)."""
    if requested is not None and requested != served:
        raise model_not_found(requested, served)


def validate_chat(request: ChatCompletionRequest, served: str, model: ServedModel) -> ValidRequest:
    check_model(request.model, served)
    refuse_unsupported_chat(request)
    messages = template_messages(request.messages)
    template_kwargs = dict(request.chat_template_kwargs or {})
    reserved = sorted(RESERVED_TEMPLATE_KWARGS & template_kwargs.keys())
    if reserved:
        raise invalid(f"chat_template_kwargs may not set {', '.join(reserved)}", "chat_template_kwargs")
    max_tokens: int | None
    if request.max_completion_tokens is not None:
        max_tokens, field = request.max_completion_tokens, "max_completion_tokens"
    else:
        max_tokens, field = request.max_tokens, "max_tokens"
    return _valid(request, ChatPrompt(messages, template_kwargs), "messages", max_tokens, field, None, model)


def validate_completion(request: CompletionRequest, served: str, model: ServedModel) -> ValidRequest:
    check_model(request.model, served)
    refuse_unsupported_completion(request)
    prompt = completion_prompt(request.prompt, model.vocab_size)
    return _valid(
        request,
        prompt,
        "prompt",
        request.max_tokens,
        "max_tokens",
        COMPLETIONS_DEFAULT_MAX_TOKENS,
        model,
    )


def _valid(
    request: ChatCompletionRequest | CompletionRequest,
    prompt: Prompt,
    prompt_field: str,
    max_tokens: int | None,
    max_tokens_field: str,
    default_max_tokens: int | None,
    model: ServedModel,
) -> ValidRequest:
    """What chat and completions check alike: stop strings, stop token ids, sampling and streaming."""
    stop = stop_strings(request.stop)
    stop_token_ids = tuple(request.stop_token_ids or ())
    check_token_ids(stop_token_ids, model.vocab_size, "stop_token_ids")
    sampling = SamplingParams(
        temperature=1.0 if request.temperature is None else request.temperature,
        top_p=1.0 if request.top_p is None else request.top_p,
        top_k=min(max(request.top_k or 0, 0), model.vocab_size),  # a larger one cuts nothing either
        seed=None if request.seed is None else request.seed % 2**64,
        min_tokens=request.min_tokens,
    )
    return ValidRequest(
        prompt=prompt,
        prompt_field=prompt_field,
        max_tokens=max_tokens,
        max_tokens_field=max_tokens_field,
        default_max_tokens=default_max_tokens,
        sampling=sampling,
        ignore_eos=request.ignore_eos,
        stop_token_ids=stop_token_ids,
        stop=stop,
        skip_special_tokens=request.skip_special_tokens,
        stream=stream_shape(request.stream_options) if request.stream else None,
    )


def stream_shape(options: StreamOptions | None) -> StreamShape:
    if options is None:
        return StreamShape()
    return StreamShape(options.include_usage, options.continuous_usage_stats)


# ------------------------------------------------------------------------------------------- refusals


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


# ------------------------------------------------------------------------------------------- contents


def template_messages(messages: list[ChatMessage]) -> list[dict[str, str]]:
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
        entry = {
            "role": "system" if message.role == "developer" else message.role,
            "content": _text_content(message, param),
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


def completion_prompt(prompt: str | list[str] | list[int] | list[list[int]], vocab_size: int) -> Prompt:
    """One text or one list of token ids (checked against the vocabulary); a batch of prompts is refused."""
    if isinstance(prompt, str):
        return prompt
    if prompt and not isinstance(prompt[0], int):  # a batch: texts, or lists of token ids
        if len(prompt) != 1:
            raise unsupported(
                "prompt",
                "prompt must be one string or one list of token ids (send one request per prompt)",
            )
        return completion_prompt(cast("str | list[int]", prompt[0]), vocab_size)
    token_ids = cast("list[int]", list(prompt))  # neither a text nor a batch: token ids
    check_token_ids(token_ids, vocab_size, "prompt")
    if not token_ids:
        raise invalid("prompt must not be empty", "prompt")
    return token_ids


def check_token_ids(token_ids: list[int] | tuple[int, ...], vocab_size: int, param: str) -> None:
    bad = [token_id for token_id in token_ids if not 0 <= token_id < vocab_size]
    if bad:
        raise invalid(f"{param}: token id {bad[0]} is outside the vocabulary [0, {vocab_size})", param)


def stop_strings(stop: str | list[str] | None, param: str = "stop") -> tuple[str, ...]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if any(not item for item in stops):
        raise invalid(f"{param}: stop strings must not be empty", param)
    return tuple(stops)
