"""Logging with the hostname and the process's role on every line, so merged logs stay readable."""

from __future__ import annotations

import logging
import os
import socket
import sys

_FORMAT = "%(asctime)s {host} [{role}] %(levelname)s %(name)s: %(message)s"


def setup_logging(role: str, level: str | None = None) -> None:
    """Configure the root logger once per process. `role` is e.g. 'coordinator' or 'worker:1'."""
    level = level or os.environ.get("MESHLLM_LOG_LEVEL", "INFO")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(_FORMAT.format(host=socket.gethostname(), role=role)))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("httpx", "httpcore", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
