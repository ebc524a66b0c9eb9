"""The API key: how a request's `Authorization` header compares with it, and the 401 that says so."""

from __future__ import annotations

import hmac
from enum import Enum

from meshllm.server.errors import INVALID_REQUEST, ErrorBody, error_body


class KeyCheck(Enum):
    OPEN = "open"  # no key is configured
    GIVEN = "given"  # the right key was sent
    MISSING = "missing"
    WRONG = "wrong"


class ApiKey:
    def __init__(self, api_key: str | None) -> None:
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    def check(self, authorization: bytes | None) -> KeyCheck:
        if self.expected is None:
            return KeyCheck.OPEN
        if not authorization:
            return KeyCheck.MISSING
        # Constant time: how much of a key matches must not show in how long the answer takes.
        return KeyCheck.GIVEN if hmac.compare_digest(authorization, self.expected) else KeyCheck.WRONG


def unauthorized_body(check: KeyCheck) -> ErrorBody:
    """OpenAI's 401 body for a key that is missing or wrong."""
    message = (
        "Incorrect API key provided."
        if check is KeyCheck.WRONG
        else "You didn't provide an API key: send 'Authorization: Bearer <key>'."
    )
    return error_body(message, INVALID_REQUEST, None, "invalid_api_key")


UNAUTHORIZED_HEADERS = {"WWW-Authenticate": "Bearer"}
