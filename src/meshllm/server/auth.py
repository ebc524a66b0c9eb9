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
    """The key as OpenAI's clients send it (`Authorization: Bearer KEY`) or Anthropic's (`x-api-key: KEY`)."""

    def __init__(self, api_key: str | None) -> None:
        self.expected = f"Bearer {api_key}".encode() if api_key else None
        self.expected_key = api_key.encode() if api_key else None

    def check(self, authorization: bytes | None, x_api_key: bytes | None = None) -> KeyCheck:
        if self.expected is None or self.expected_key is None:
            return KeyCheck.OPEN
        if not authorization and not x_api_key:
            return KeyCheck.MISSING
        # Constant time, and both compared always: how much of a key matches, or which header held it,
        # must not show in how long the answer takes.
        bearer_ok = hmac.compare_digest(authorization or b"", self.expected)
        key_ok = hmac.compare_digest(x_api_key or b"", self.expected_key)
        return KeyCheck.GIVEN if bearer_ok or key_ok else KeyCheck.WRONG


def unauthorized_message(check: KeyCheck) -> str:
    if check is KeyCheck.WRONG:
        return "Incorrect API key provided."
    return "You didn't provide an API key: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'."


def unauthorized_body(check: KeyCheck) -> ErrorBody:
    """OpenAI's 401 body for a key that is missing or wrong."""
    return error_body(unauthorized_message(check), INVALID_REQUEST, None, "invalid_api_key")


UNAUTHORIZED_HEADERS = {"WWW-Authenticate": "Bearer"}
