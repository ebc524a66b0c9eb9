"""Shared fixtures: tiny random-weight checkpoints (made once per test run) and free local ports."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from meshllm.models.tiny import TinySpec, make_checkpoint

# Several stage processes share this machine's cores in the tests: keep each one from oversubscribing.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """`tiny_checkpoint(arch="qwen3", layers=4, seed=0, shards=1)` -> the folder of that checkpoint.

    Each distinct set of arguments is made once per test run and then shared.
    """
    made: dict[tuple, Path] = {}

    def make(arch: str = "qwen3", layers: int = 4, seed: int = 0, shards: int = 1) -> Path:
        key = (arch, layers, seed, shards)
        if key not in made:
            folder = tmp_path_factory.mktemp(f"tiny-{arch}-{layers}l-s{seed}-x{shards}")
            made[key] = make_checkpoint(
                folder, arch=arch, seed=seed, spec=TinySpec(num_hidden_layers=layers), shards=shards
            )
        return made[key]

    return make
