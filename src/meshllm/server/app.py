"""The FastAPI app: thin routes over `OpenAIServing`, error handlers, SSE, API key and request metrics.

Routes under /v1/messages speak Anthropic's Messages API: their errors (every one, from validation to a
401 or an unexpected exception) come in Anthropic's shape, and their streams are named SSE events."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Mapping, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from meshllm import __version__
from meshllm.runtime.engine_client import EngineClient
from meshllm.server import anthropic
from meshllm.server.anthropic import CountTokensRequest, MessagesRequest, MessageStream
from meshllm.server.auth import (
    UNAUTHORIZED_HEADERS,
    ApiKey,
    KeyCheck,
    unauthorized_body,
    unauthorized_message,
)
from meshllm.server.console import add_console
from meshllm.server.errors import INVALID_REQUEST, SERVER_ERROR, APIError, error_body
from meshllm.server.metrics import ServerMetrics
from meshllm.server.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    GpuInfoResponse,
    HealthResponse,
    ModelCard,
    ModelList,
)
from meshllm.server.replies import EventStream
from meshllm.server.serving import OpenAIServing

log = logging.getLogger(__name__)

CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left before the reply (metrics only)
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
# Union members in pydantic error locations ("str", "list[int]", "ContentPart"), which are not fields.
_UNION_TAG = re.compile(r"^(str|int|float|bool|none|[A-Za-z_]+\[.*\]|[A-Z]\w*)$")

# The answers the OpenAPI document lists, each error with OpenAI's body.
Responses = dict[int | str, dict[str, object]]  # FastAPI's `responses`: status -> OpenAPI response object

_ERRORS: Responses = {
    400: {"model": ErrorResponse, "description": "The request is invalid; `param` names the field"},
    401: {"model": ErrorResponse, "description": "An API key is set and the request did not carry it"},
    404: {"model": ErrorResponse, "description": "Another model than the served one was asked for"},
    422: {
        "model": ErrorResponse,
        "description": "Not sent: a body that fails validation is a 400, as with OpenAI (listed for "
        "clients that expect FastAPI's 422)",
    },
    503: {
        "model": ErrorResponse,
        "description": "The pipeline cannot take requests now (a device is down); retry after a while",
        "headers": {
            "Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}
        },
    },
}
# With stream: true, each event's data is one JSON chunk of the reply; the last is "[DONE]".
_SSE_EVENT = {"type": "object", "properties": {"data": {"type": "string"}}, "required": ["data"]}
_SSE = {"text/event-stream": {"schema": _SSE_EVENT}}


def _generation_responses(model: type[BaseModel]) -> Responses:
    return {200: {"model": model, "content": _SSE, "description": "The reply, or its SSE stream"}, **_ERRORS}


# The Messages API answers the same statuses, each with Anthropic's error body; its stream is named events.
_MESSAGES_ERRORS: Responses = {
    status: {**response, "model": anthropic.MessagesErrorResponse} for status, response in _ERRORS.items()
}
_MESSAGES_SSE = {
    "text/event-stream": {
        "schema": {
            "type": "object",
            "properties": {"event": {"type": "string"}, "data": {"type": "string"}},
            "required": ["event", "data"],
        }
    }
}


def build_app(
    client: EngineClient,
    served_model_name: str | None = None,
    api_key: str | None = None,
) -> FastAPI:
    """The API of one engine client. With `api_key`, every /v1 route wants `Authorization: Bearer <key>`."""
    metrics = ServerMetrics(
        live_sequences=lambda: client.live_sequences, waiting_sequences=lambda: client.waiting_sequences
    )
    client.add_step_listener(metrics.observe_step)
    serving = OpenAIServing(client, served_model_name, metrics)

    app = FastAPI(title="meshllm", version=__version__, docs_url=None, redoc_url=None)
    app.state.serving = serving
    app.state.metrics = metrics
    _add_error_handlers(app)

    @app.get("/v1/models", responses={200: {"model": ModelList}, 401: _ERRORS[401]})
    async def list_models() -> JSONResponse:
        return JSONResponse(serving.models().model_dump(mode="json"))

    @app.get(
        "/v1/models/{model_id:path}",
        responses={200: {"model": ModelCard}, 401: _ERRORS[401], 404: _ERRORS[404], 422: _ERRORS[422]},
    )
    async def retrieve_model(model_id: str) -> JSONResponse:
        serving.check_model(model_id)
        return JSONResponse(serving.models().data[0].model_dump(mode="json"))

    @app.post("/v1/chat/completions", responses=_generation_responses(ChatCompletionResponse))
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await _reply(request, serving.chat(body))

    @app.post("/v1/completions", responses=_generation_responses(CompletionResponse))
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await _reply(request, serving.completion(body))

    @app.post(
        "/v1/messages",
        responses={
            200: {
                "model": anthropic.MessageResponse,
                "content": _MESSAGES_SSE,
                "description": "The reply, or its stream",
            },
            **_MESSAGES_ERRORS,
        },
    )
    async def messages(body: MessagesRequest, request: Request) -> Response:
        return await _reply(request, serving.messages(body))

    @app.post(
        "/v1/messages/count_tokens",
        responses={200: {"model": anthropic.TokenCount}, **_MESSAGES_ERRORS},
    )
    async def count_tokens(body: CountTokensRequest) -> JSONResponse:
        return JSONResponse((await serving.count_tokens(body)).model_dump(mode="json"))

    health_responses: Responses = {
        200: {"model": HealthResponse, "description": "Every device is up with its layers"},
        503: {"model": HealthResponse, "description": "A device is down; `message` and `devices` say which"},
    }

    @app.get("/health", responses=health_responses)
    async def health() -> JSONResponse:
        status, body = serving.health()
        return JSONResponse(body.model_dump(mode="json"), status_code=status)

    @app.get("/distributed/gpu-info", responses={200: {"model": GpuInfoResponse}})
    async def gpu_info() -> JSONResponse:
        return JSONResponse((await serving.gpu_info()).model_dump(mode="json"))

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus_metrics() -> Response:
        content, content_type = metrics.render()
        return Response(content, media_type=content_type)

    add_console(app, serving, metrics.recent, ApiKey(api_key))
    _document_model_limits(app, client.model.max_context, client.model.vocab_size)
    # Outermost first: requests are counted whatever the API key check decides.
    app.add_middleware(ApiKeyMiddleware, api_key=api_key)
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics)
    return app


def _document_model_limits(app: FastAPI, max_context: int, vocab_size: int) -> None:
    """The OpenAPI document with the served model's limits: at most the context less one prompt token to
    generate, token ids within the vocabulary (validation refuses anything else)."""
    build = app.openapi

    def openapi() -> dict[str, object]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        document = build()
        for name in ("ChatCompletionRequest", "CompletionRequest"):
            properties = document.get("components", {}).get("schemas", {}).get(name, {}).get("properties", {})
            for field in ("max_tokens", "max_completion_tokens"):
                _bound(properties.get(field), "maximum", max_context - 1)
            for field in ("prompt", "stop_token_ids"):
                _bound(properties.get(field), "maximum", vocab_size - 1)
        app.openapi_schema = document
        return document

    app.openapi = openapi  # type: ignore[method-assign]


def _bound(node: object, key: str, value: int) -> None:
    """Every integer schema inside `node` without `key` gets it (e.g. each token id's maximum)."""
    if isinstance(node, dict):
        if node.get("type") == "integer" and key not in node:
            node[key] = value
        for child in node.values():
            _bound(child, key, value)
    elif isinstance(node, list):
        for child in node:
            _bound(child, key, value)


async def _reply(request: Request, pending: Awaitable[BaseModel | EventStream | MessageStream]) -> Response:
    """A JSON reply, or an SSE stream; a client that leaves before a JSON reply cancels its sequence."""
    task = asyncio.ensure_future(pending)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():  # the client is gone: cancelling the task cancels the sequence
        task.cancel()
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    result = task.result()
    if isinstance(result, (EventStream, MessageStream)):
        return StreamingResponse(
            _sse(result) if isinstance(result, EventStream) else _named_sse(result),
            media_type="text/event-stream",
            headers=SSE_HEADERS,
            background=BackgroundTask(result.close),
        )
    return JSONResponse(result.model_dump(mode="json"))


async def _disconnected(request: Request) -> None:
    """Returns once the client has closed the connection (the body is already read by then)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _sse(stream: EventStream) -> AsyncIterator[str]:
    try:
        async for payload in stream:
            yield f"data: {payload}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        # Runs on normal end and when the client disconnects (the response task is cancelled).
        stream.close()


async def _named_sse(stream: MessageStream) -> AsyncIterator[str]:
    """Anthropic's stream: complete `event:`/`data:` events, and no `[DONE]`."""
    try:
        async for event in stream:
            yield event
    finally:
        stream.close()


# ------------------------------------------------------------------------------------------------ errors


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        if anthropic.is_messages_path(request.url.path):
            body: object = anthropic.api_error_body(error)
        else:
            body = error.body()
        return JSONResponse(body, status_code=error.status, headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        message, param = describe_validation_errors(error.errors())
        if anthropic.is_messages_path(request.url.path):
            return JSONResponse(anthropic.error_body(message, "invalid_request_error"), status_code=400)
        return JSONResponse(error_body(message, INVALID_REQUEST, param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        if error.status_code == 404:
            message = (
                f"Unknown path {request.url.path}; see /v1/models, /v1/chat/completions, /v1/completions, "
                "/v1/messages"
            )
        elif error.status_code == 405:
            message = f"Method {request.method} is not allowed on {request.url.path}"
        else:
            message = str(error.detail)
        if anthropic.is_messages_path(request.url.path):
            return JSONResponse(
                anthropic.error_body(message, anthropic.error_type(error.status_code)),
                status_code=error.status_code,
                headers=error.headers,
            )
        code = "not_found" if error.status_code == 404 else None
        return JSONResponse(
            error_body(message, INVALID_REQUEST, None, code),
            status_code=error.status_code,
            headers=error.headers,
        )

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, error: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        message = f"internal error: {type(error).__name__}: {error}".splitlines()[0]
        if anthropic.is_messages_path(request.url.path):
            return JSONResponse(anthropic.error_body(message, "api_error"), status_code=500)
        return JSONResponse(error_body(message, SERVER_ERROR, None, "internal_error"), status_code=500)


def describe_validation_errors(errors: Sequence[Mapping[str, object]]) -> tuple[str, str | None]:
    """One message naming the fields at fault, and the first of them as OpenAI's `param`."""
    problems: dict[str, list[str]] = {}
    for error in errors:
        kind, loc = error.get("type", ""), error.get("loc", ())
        path = _param_path(loc if isinstance(loc, (tuple, list)) else ())
        if kind == "json_invalid":
            ctx = error.get("ctx")
            reason = ctx.get("error", "") if isinstance(ctx, dict) else ""
            return f"The request body is not valid JSON ({reason}).", None
        if not path:
            return "The request body must be a JSON object.", None
        if kind == "extra_forbidden":
            return f"Unrecognized request argument supplied: {path}", path
        if kind == "missing":
            return f"Missing required parameter: '{path}'.", path
        problems.setdefault(path, []).append(str(error.get("msg", "invalid value")))
    if not problems:
        return "The request is not valid.", None
    parts = [f"'{path}': {' or '.join(dict.fromkeys(messages))}" for path, messages in problems.items()]
    return "Invalid request: " + "; ".join(parts) + ".", next(iter(problems))


def _param_path(loc: Sequence[object]) -> str:
    """("body", "messages", 0, "content", "str") -> "messages[0].content"."""
    path = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif _UNION_TAG.match(str(part)):
            continue
        else:
            path += f".{part}" if path else str(part)
    return path


# -------------------------------------------------------------------------------------------- middleware


class ApiKeyMiddleware:
    """With an API key set, /v1 routes answer 401 unless `Authorization: Bearer <key>` or (Anthropic's
    header) `x-api-key: <key>`; in Anthropic's error shape under /v1/messages, OpenAI's elsewhere."""

    def __init__(self, app: ASGIApp, api_key: str | None) -> None:
        self.app = app
        self.api_key = ApiKey(api_key)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.api_key.expected is None or scope["type"] != "http" or not scope["path"].startswith("/v1"):
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"])
        check = self.api_key.check(given.get(b"authorization"), given.get(b"x-api-key"))
        if check is KeyCheck.GIVEN:
            await self.app(scope, receive, send)
            return
        if anthropic.is_messages_path(scope["path"]):
            error: object = anthropic.error_body(unauthorized_message(check), "authentication_error")
        else:
            error = unauthorized_body(check)
        body = json.dumps(error).encode()
        headers = [(b"content-type", b"application/json")] + [
            (name.lower().encode(), value.encode()) for name, value in UNAUTHORIZED_HEADERS.items()
        ]
        await send({"type": "http.response.start", "status": 401, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class RequestMetricsMiddleware:
    """Counts every HTTP request by endpoint and status code."""

    ENDPOINTS = frozenset(
        {
            "/v1/chat/completions",
            "/v1/completions",
            "/v1/messages",
            "/v1/messages/count_tokens",
            "/v1/models",
            "/health",
            "/distributed/gpu-info",
            "/metrics",
            "/",
            "/console/stats",
        }
    )

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        path = scope["path"]
        endpoint = (
            path if path in self.ENDPOINTS else "/v1/models" if path.startswith("/v1/models/") else "other"
        )
        try:
            await self.app(scope, receive, send_and_record)
        except asyncio.CancelledError:
            status = CLIENT_CLOSED_REQUEST
            raise
        finally:
            self.metrics.observe_request(endpoint, status)
