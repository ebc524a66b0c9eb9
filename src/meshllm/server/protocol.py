"""Pydantic models of every request and response of the API, in OpenAI's shapes.

Requests are strict (no "10" for 10, no "yes" for true) and refuse unknown fields, as OpenAI does. Fields
that OpenAI defines but this server does not implement are declared here so that `validation` can refuse
them with a message naming the field (or accept them when ignoring them is harmless); see docs/api.md.
"""

from __future__ import annotations

import time
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    SerializerFunctionWrapHandler,
    WithJsonSchema,
    model_serializer,
)
from pydantic.json_schema import JsonDict

from meshllm.devices import DeviceStatus, Status

# ---------------------------------------------------------------------------------------------- requests

# What `validation` refuses with its own messages, said in the OpenAPI document too (the document only:
# the checks stay in `validation`, which names the field the way OpenAI does). `app` adds the limits that
# depend on the served model (the context for max_tokens, the vocabulary for token ids).
_TOKEN_ID = {"type": "integer", "minimum": 0}
NonEmptyText = Annotated[str, WithJsonSchema({"type": "string", "minLength": 1})]
OneText = Annotated[
    list[str],
    WithJsonSchema(
        {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1, "maxItems": 1}
    ),
]
TokenIds = Annotated[list[int], WithJsonSchema({"type": "array", "items": _TOKEN_ID, "minItems": 1})]
OneTokenIds = Annotated[
    list[list[int]],
    WithJsonSchema(
        {
            "type": "array",
            "items": {"type": "array", "items": _TOKEN_ID, "minItems": 1},
            "minItems": 1,
            "maxItems": 1,
        }
    ),
]
StopTokenIds = Annotated[list[int], WithJsonSchema({"type": "array", "items": _TOKEN_ID})]
_NEUTRAL: JsonDict = {"minimum": 0, "maximum": 0}  # accepted only at 0


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Request):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's extension: usage on every chunk
    include_obfuscation: bool | None = None  # ignored: no obfuscation padding is added


class ContentPart(BaseModel):
    """One part of a message's content; only `{"type": "text", "text": ...}` is served."""

    model_config = ConfigDict(extra="allow", strict=True)
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    """A message of the conversation. Unknown keys are tolerated (clients echo back whole replies)."""

    model_config = ConfigDict(extra="allow", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, JsonValue]] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None  # earlier thinking, for templates that render it


class _SamplingRequest(_Request):
    """What chat and completions requests share: the model, sampling, stopping and streaming."""

    model: str | None = None  # None: the served model
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = None
    stop: NonEmptyText | list[NonEmptyText] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(default=None, ge=1, json_schema_extra={"maximum": 1})
    user: str | None = None
    # OpenAI fields accepted only at their neutral value (validation refuses any other).
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0, json_schema_extra=_NEUTRAL)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0, json_schema_extra=_NEUTRAL)
    logit_bias: dict[str, float] | None = Field(default=None, json_schema_extra={"maxProperties": 0})
    # Extensions (vLLM's names).
    top_k: int | None = Field(default=None, ge=-1)  # 0 or -1: no top-k cut
    min_tokens: int = Field(default=0, ge=0)  # end-of-sequence is banned until this many tokens
    ignore_eos: bool = False  # keep generating past end-of-sequence tokens, up to max_tokens
    stop_token_ids: StopTokenIds | None = None  # stop (and leave out) when one of these is sampled
    skip_special_tokens: bool = True


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(json_schema_extra={"minItems": 1})
    max_completion_tokens: int | None = Field(default=None, ge=1)
    chat_template_kwargs: dict[str, JsonValue] | None = None  # e.g. {"enable_thinking": false}
    # Accepted and ignored: hints with no effect on a self-hosted model.
    metadata: dict[str, JsonValue] | None = None
    store: bool | None = None
    service_tier: str | None = None
    parallel_tool_calls: bool | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    prompt_cache_options: dict[str, JsonValue] | None = None
    safety_identifier: str | None = None
    moderation: JsonValue = None
    # Refused unless neutral.
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[dict[str, JsonValue]] | None = None
    tool_choice: str | dict[str, JsonValue] | None = None
    functions: list[dict[str, JsonValue]] | None = None
    function_call: str | dict[str, JsonValue] | None = None
    response_format: dict[str, JsonValue] | None = None
    modalities: list[str] | None = None
    audio: dict[str, JsonValue] | None = None
    prediction: dict[str, JsonValue] | None = None
    web_search_options: dict[str, JsonValue] | None = None


class CompletionRequest(_SamplingRequest):
    # A string, a one-element list of strings, token ids, or a one-element list of token id lists.
    prompt: NonEmptyText | OneText | TokenIds | OneTokenIds
    # Refused unless neutral.
    logprobs: int | None = None
    echo: bool | None = None
    best_of: int | None = Field(default=None, json_schema_extra={"minimum": 1, "maximum": 1})
    suffix: str | None = None


# --------------------------------------------------------------------------------------------- responses


class ErrorObject(BaseModel):
    message: str  # what is wrong, and what to do
    type: str  # invalid_request_error | server_error
    param: str | None  # the request field at fault
    code: str | None  # e.g. model_not_found, context_length_exceeded, invalid_api_key, pipeline_unavailable


class ErrorResponse(BaseModel):
    """Every error of the API, in OpenAI's shape."""

    error: ErrorObject


def _now() -> int:
    return int(time.time())


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: str | None = None


class ChatCompletionChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: Literal["stop", "length"]


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo
    system_fingerprint: str | None = None


class DeltaMessage(BaseModel):
    """A streamed piece of the reply; unset fields are left out, as OpenAI does (`{"content": "Hi"}`)."""

    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler: SerializerFunctionWrapHandler) -> dict[str, str]:
        return {key: value for key, value in handler(self).items() if value is not None}


class ChatCompletionStreamChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatCompletionStreamChoice]
    usage: UsageInfo | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "meshllm"
    root: str  # the checkpoint it was loaded from
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ------------------------------------------------------------------------------------- cluster endpoints


class GpuInfoResponse(BaseModel):
    devices: list[DeviceStatus]  # first stage first
    cluster_status: Literal["healthy", "degraded"]
    world_size: int
    model: str
    live_sequences: int


class DeviceHealth(BaseModel):
    name: str
    address: str
    status: Status
    error: str = ""
    in_plan: bool = True  # False: left out of the layer plan; the other devices run its layers


class HealthResponse(BaseModel):
    status: Literal["healthy", "degraded", "unhealthy"]  # degraded: serving with devices left out
    model: str
    message: str = ""
    devices: list[DeviceHealth]
