"""Shared fixtures: tiny random-weight checkpoints (made once per test run) and free local ports."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from meshllm.defaults import PREDICT_ENV
from meshllm.models.tiny import TinySpec, make_checkpoint
from meshllm.runtime.local_workers import LocalWorkers, free_ports

# Several stage processes share this machine's cores in the tests: keep each one from oversubscribing.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# No calibration and speed prediction at every coordinator start: a second or more per device on a busy
# machine. The tests of the prediction turn it back on.
os.environ[PREDICT_ENV] = "0"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    return free_ports(1)[0]


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


class WorkerProcess:
    """A real `meshllm worker` process on 127.0.0.1 (started as `meshllm serve` starts its own), its log in a
    temporary file, stopped by pid."""

    def __init__(
        self,
        name: str,
        token: str | None = None,
        engine: str | None = None,
        port: int | None = None,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        args: list[str] | None = None,
    ):
        import tempfile

        self.name = name
        self.port = port or free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(prefix=f"meshllm-{name}-", suffix=".log", delete=False)
        worker = LocalWorkers().start(
            name,
            self.port,
            token,
            threads=1,
            engine=engine,
            output=self.log.fileno(),
            env=env,
            cwd=cwd,
            args=args,
        )
        self.process = worker.process

    def log_tail(self) -> str:
        return Path(self.log.name).read_text(errors="replace")[-3000:]

    def wait_ready(self, timeout: float = 60.0) -> None:
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"worker {self.name} exited: {self.log_tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.1)
        raise TimeoutError(f"worker {self.name} did not listen on {self.address} within {timeout} s")

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)
        self.log.close()
        Path(self.log.name).unlink(missing_ok=True)


@pytest.fixture
def start_workers():
    """`start_workers(n, token=None, engine=None, prefix="w", args=None)` -> n ready WorkerProcess (with
    `args` on their command lines); all killed after the test."""
    started: list[WorkerProcess] = []

    def start(
        n: int,
        token: str | None = None,
        engine: str | None = None,
        prefix: str = "w",
        args: list[str] | None = None,
    ) -> list[WorkerProcess]:
        workers = [
            WorkerProcess(f"{prefix}{len(started) + i + 1}", token, engine, args=args) for i in range(n)
        ]
        started.extend(workers)
        for worker in workers:
            worker.wait_ready()
        return workers

    yield start
    for worker in started:
        worker.kill()
