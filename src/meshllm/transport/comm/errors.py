"""What the communicator raises. Every message names this rank and the peer rank at fault."""

from __future__ import annotations

from meshllm.errors import MeshError


class CommError(MeshError):
    """A communicator operation failed."""


class CommTimeoutError(CommError, TimeoutError):
    """A receive, send or collective did not complete within the timeout; `except TimeoutError` catches it."""


class PeerLostError(CommError):
    """A peer rank went away (its process died or its connection broke) while this rank still needed it."""

    def __init__(self, message: str, peer: int) -> None:
        super().__init__(message)
        self.peer = peer


class CommAuthError(CommError):
    """A peer refused this rank's cluster token (gRPC UNAUTHENTICATED)."""
