"""What every gRPC link of meshllm shares: options, the cluster token, and failures told as sentences.

The stage service, its clients and the communicator all use these, so a token is carried, checked and
refused the same way everywhere, and a failed call reads the same whichever part made it.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping

import grpc

from meshllm import __version__

VERSION = __version__
PROTOCOL_VERSION = 3  # bumped when the stage protocol changes in a way older peers cannot follow
TOKEN_METADATA_KEY = "x-meshllm-token"  # gRPC metadata: the cluster token, on every call when there is one
MAX_MESSAGE_BYTES = 1024 * 1024 * 1024  # a long prefill chunk of a large model fits comfortably

CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # Notice a peer that vanished (machine off, cable out) within seconds, not minutes.
    ("grpc.keepalive_time_ms", 5000),
    ("grpc.keepalive_timeout_ms", 5000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]
SERVER_OPTIONS = [
    ("grpc.so_reuseport", 0),  # a second server on a taken port must fail, not share it
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 1000),
    ("grpc.http2.max_ping_strikes", 0),
]


def token_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """The metadata that carries `token` (none without a token)."""
    return ((TOKEN_METADATA_KEY, token),) if token else ()


def token_problem(expected: str | None, metadata: Mapping[str, str | bytes] | None) -> str | None:
    """Why a call's metadata does not carry the `expected` token, or None when it does (or none is set).

    The comparison takes the same time however much of the token matches.
    """
    if not expected:
        return None
    presented = (metadata or {}).get(TOKEN_METADATA_KEY)
    if presented is None:
        return "no cluster token"
    given = presented if isinstance(presented, bytes) else str(presented).encode()
    return None if hmac.compare_digest(given, expected.encode()) else "a wrong cluster token"


def insecure_channel(address: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)


def status_code(error: grpc.RpcError) -> grpc.StatusCode | None:
    """The status of a failed call (blocking or asyncio); None for an error that carries none."""
    code = getattr(error, "code", None)
    return code() if callable(code) else None


def explain(error: grpc.RpcError, device: str, address: str) -> str:
    """One sentence naming the device, what went wrong, and what to do about it."""
    code = status_code(error)
    details_of = getattr(error, "details", None)
    details = (details_of() if callable(details_of) else str(error)) or (code.name if code else "error")
    where = f"device '{device}' ({address})"
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return f"{where} refused the cluster token ({details}); give it the same token as the coordinator"
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) and "worker " not in details:
        port = address.rsplit(":", 1)[-1]
        return (
            f"{where} is unreachable ({code.name.lower()}: {details}); "
            f"is `meshllm worker --port {port}` running there?"
        )
    return f"{where}: {details}"


def is_refusal(error: grpc.RpcError) -> bool:
    """The peer answered but refused the cluster token."""
    return status_code(error) == grpc.StatusCode.UNAUTHENTICATED
