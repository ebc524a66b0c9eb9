"""The API's socket and its uvicorn server, for `meshllm serve` and the tests."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator

import uvicorn

from meshllm.errors import ConfigError


def bind_socket(host: str, port: int) -> socket.socket:
    """The API's listening socket, bound now so that a busy port is reported before anything slow."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as error:
        raise ConfigError(f"--host {host}: cannot resolve it ({error.strerror})") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as error:
        sock.close()
        raise ConfigError(
            f"cannot listen on {host}:{port} ({error.strerror}); is it in use? pass --port"
        ) from None
    return sock


class ApiServer(uvicorn.Server):
    """uvicorn, minus its own signal handling: the caller decides when to stop (and stops the workers)."""

    def __init__(self, app: object, graceful_shutdown: float = 3.0) -> None:
        config = uvicorn.Config(
            app,  # type: ignore[arg-type]
            log_config=None,  # keep the process's logging format (hostname and role on every line)
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=int(graceful_shutdown),
        )
        super().__init__(config)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield
