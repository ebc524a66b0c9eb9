"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with an HTTP status.

The request path raises `APIError` for anything the client can fix or should retry; `app` turns it (and
every other exception) into a JSON body of this shape, so a client never sees a stack trace.
"""

from __future__ import annotations

INVALID_REQUEST = "invalid_request_error"
SERVER_ERROR = "server_error"

ErrorBody = dict[str, dict[str, str | None]]  # {"error": {"message", "type", "param", "code"}}


class APIError(Exception):
    """An error to send to the client as it is: `status` and the fields of OpenAI's error object."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        type: str = INVALID_REQUEST,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> ErrorBody:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(
    message: str, type: str = INVALID_REQUEST, param: str | None = None, code: str | None = None
) -> ErrorBody:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """400: the request is wrong in a way the message explains; `param` names the field."""
    return APIError(message, 400, INVALID_REQUEST, param, code)


def unsupported(param: str, what: str | None = None) -> APIError:
    """400 for an OpenAI field this server understands but does not implement."""
    detail = what or f"'{param}' is not supported by this server"
    return APIError(detail, 400, INVALID_REQUEST, param, "unsupported_parameter")


def model_not_found(model: str, served: str) -> APIError:
    return APIError(
        f"The model '{model}' does not exist; this server serves '{served}'.",
        404,
        INVALID_REQUEST,
        "model",
        "model_not_found",
    )


RETRY_AFTER = 5  # seconds a client is told to wait before retrying a 503 (a worker restarts within that)


def unavailable(message: str) -> APIError:
    """503: the pipeline cannot take the request now (a device is down); retrying later may work."""
    return APIError(
        message, 503, SERVER_ERROR, None, "pipeline_unavailable", {"Retry-After": str(RETRY_AFTER)}
    )


def pipeline_failed(message: str) -> ErrorBody:
    """The body of the error event that ends a stream whose pipeline failed after the first token."""
    return error_body(message, SERVER_ERROR, None, "pipeline_error")
