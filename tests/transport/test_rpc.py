"""What every gRPC link shares: the token check and failures told as sentences."""

from __future__ import annotations

import grpc
import pytest

from meshllm.transport.rpc import TOKEN_METADATA_KEY, explain, token_metadata, token_problem


def test_a_call_without_the_token_or_with_a_wrong_one_is_told_apart() -> None:
    assert token_problem("s3cret", {}) == "no cluster token"
    assert token_problem("s3cret", {TOKEN_METADATA_KEY: "s3creT"}) == "a wrong cluster token"
    assert token_problem("s3cret", {TOKEN_METADATA_KEY: b"s3cret"}) is None
    assert token_problem("s3cret", dict(token_metadata("s3cret"))) is None


def test_without_a_cluster_token_every_call_is_let_in() -> None:
    assert token_problem(None, {}) is None and token_metadata(None) == ()


class _Failed(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


@pytest.mark.parametrize(
    ("code", "details", "expected"),
    [
        (
            grpc.StatusCode.UNAUTHENTICATED,
            "no token",
            "device 'mini2' (10.0.0.2:50051) refused the cluster token",
        ),
        (
            grpc.StatusCode.UNAVAILABLE,
            "connection refused",
            "is `meshllm worker --port 50051` running there?",
        ),
        (grpc.StatusCode.DEADLINE_EXCEEDED, "", "device 'mini2' (10.0.0.2:50051) is unreachable"),
        (
            grpc.StatusCode.INTERNAL,
            "worker mini2: boom",
            "device 'mini2' (10.0.0.2:50051): worker mini2: boom",
        ),
    ],
)
def test_a_failed_call_is_one_sentence_naming_the_device_and_the_fix(code, details, expected) -> None:
    assert expected in explain(_Failed(code, details), "mini2", "10.0.0.2:50051")
