"""gRPC settings shared by workers and the coordinator."""

from __future__ import annotations

from meshllm import __version__

PROTOCOL_VERSION = 1
TOKEN_METADATA_KEY = "x-meshllm-token"
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
    ("grpc.so_reuseport", 0),  # a second worker on a taken port must fail, not share it
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 1000),
    ("grpc.http2.max_ping_strikes", 0),
]


def token_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return ((TOKEN_METADATA_KEY, token),) if token else ()


VERSION = __version__
