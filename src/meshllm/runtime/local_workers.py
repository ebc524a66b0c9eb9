"""Worker processes on this machine, started by `meshllm serve`, the tests and the benchmarks: spawned on
free ports, waited for, and stopped by pid (never by name)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from meshllm.defaults import TOKEN_ENV
from meshllm.errors import StageError
from meshllm.runtime.backoff import Backoff
from meshllm.runtime.coordinator_config import WorkerAddress

log = logging.getLogger(__name__)

WORKER_START_TIMEOUT = 120.0  # seconds for a local worker to answer Health (imports torch first)
PR_SET_PDEATHSIG = 1  # prctl option: the signal a process gets when its parent dies


@dataclass
class LocalWorker:
    address: WorkerAddress
    process: subprocess.Popen
    command: list[str] = field(default_factory=list)  # how it was started, to start it again
    env: dict[str, str] = field(default_factory=dict)
    output: int | None = None
    cwd: str | None = None  # the folder it runs in; None: this process's
    backoff: Backoff = field(default_factory=Backoff)
    restart_at: float | None = None  # when a dead worker is started again (monotonic seconds)

    @property
    def pid(self) -> int:
        return self.process.pid

    def launch(self) -> None:
        self.process = subprocess.Popen(
            self.command,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=self.output,
            stderr=self.output,
            cwd=self.cwd,
            start_new_session=True,  # Ctrl-C reaches serve only; serve stops the workers in order
        )
        self.backoff.succeeded()


class LocalWorkers:
    """Worker processes this process started, stopped by pid (never by name) when it stops."""

    def __init__(self) -> None:
        self.workers: list[LocalWorker] = []
        self._stopping = False

    @property
    def pids(self) -> list[int]:
        return [worker.pid for worker in self.workers]

    def start(
        self,
        name: str,
        port: int,
        token: str | None,
        threads: int,
        host: str = "127.0.0.1",
        engine: str | None = None,
        output: int | None = None,
        env: dict[str, str] | None = None,
        kv_memory: int | float | None = None,
        cwd: str | None = None,
        args: list[str] | None = None,
    ) -> LocalWorker:
        """Start one `meshllm worker` on `host:port`. Its log goes to this process's stderr, or to
        `output` (a file descriptor, or `subprocess.DEVNULL`); `env` adds to the environment and `args`
        to its command line (e.g. its certificates); it runs in `cwd` (default: this process's folder)."""
        command = ["-m", "meshllm", "worker", "--host", host, "--port", str(port)]
        command += ["--threads", str(threads), "--name", name, *(args or [])]
        if engine:
            command += ["--engine", engine]
        if kv_memory is not None:
            # bytes, or a share of free memory as a percentage (what `meshllm worker --kv-memory` reads)
            share = isinstance(kv_memory, float)
            command += ["--kv-memory", f"{kv_memory * 100:g}%" if share else str(kv_memory)]
        worker = LocalWorker(
            WorkerAddress(name=name, address=f"{host}:{port}"),
            process=None,  # type: ignore[arg-type]  # launched just below
            command=_dying_with_this_process(command),
            # The token goes by environment: on the command line `ps` would show it, and one that
            # starts with "-" reads as an option.
            env={**os.environ, "OMP_NUM_THREADS": str(threads), TOKEN_ENV: token or "", **(env or {})},
            output=output,
            cwd=cwd,
        )
        worker.launch()
        self.workers.append(worker)
        log.info("started %s on %s:%d (pid %d, %d threads)", name, host, port, worker.pid, threads)
        return worker

    async def supervise(
        self, on_exit: Callable[[str, str], None] | None = None, interval: float = 0.5
    ) -> None:
        """Start again every worker that dies, after a backoff that doubles while it keeps dying (1 s up to
        30 s); `on_exit(name, message)` hears of each exit. Runs until cancelled."""
        while True:
            await asyncio.sleep(interval)
            for worker in self.workers:
                if self._stopping:
                    return
                code = worker.process.poll()
                if code is None:
                    continue
                if worker.restart_at is None:  # it just died
                    self._note_exit(worker, code, on_exit)
                elif time.monotonic() >= worker.restart_at:
                    worker.restart_at = None
                    worker.launch()
                    log.warning("started %s again (pid %d)", worker.address.name, worker.pid)

    def _note_exit(self, worker: LocalWorker, code: int, on_exit: Callable[[str, str], None] | None) -> None:
        delay = worker.backoff.delay()
        worker.restart_at = time.monotonic() + delay
        how = f"signal {signal.Signals(-code).name}" if code < 0 else f"status {code}"
        message = (
            f"the local worker {worker.address.name} (pid {worker.pid}) exited with {how}; "
            f"starting it again in {delay:.0f} s (see its output above)"
        )
        log.warning("%s", message)
        if on_exit is not None:
            on_exit(worker.address.name, message)

    def spawn(
        self,
        count: int,
        token: str | None,
        threads: int,
        host: str = "127.0.0.1",
        output: int | None = None,
        kv_memory: int | float | None = None,
        engine: str | None = None,
        threads_alone: int | None = None,
        env: dict[str, str] | None = None,
    ) -> list[WorkerAddress]:
        """Start `count` workers (worker1, worker2, …) on free ports of `host`, on `engine` (None: the
        platform's default), with `env` added to their environment; their addresses in chain order."""
        first = len(self.workers) + 1
        ports = free_ports(count, host)
        started = [
            self.start(
                f"worker{first + index}",
                port,
                token,
                threads,
                host,
                engine=engine,
                output=output,
                kv_memory=kv_memory,
                args=["--threads-alone", str(threads_alone)] if threads_alone else None,
                env=env,
            )
            for index, port in enumerate(ports)
        ]
        return [worker.address for worker in started]

    async def wait_healthy(self, token: str | None, timeout: float = WORKER_START_TIMEOUT) -> None:
        """Returns once every worker answers gRPC Health; a worker that exits or never answers is an error."""
        await asyncio.gather(*(_wait_for_health(worker, token, timeout) for worker in self.workers))

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM every worker still running, then SIGKILL those still there after `grace` seconds."""
        self._stopping = True
        running = [worker for worker in self.workers if worker.process.poll() is None]
        for worker in running:
            with contextlib.suppress(ProcessLookupError):
                worker.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for worker in running:
            try:
                worker.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning(
                    "%s (pid %d) did not stop in %.0f s: killing it", worker.address.name, worker.pid, grace
                )
                with contextlib.suppress(ProcessLookupError):
                    worker.process.kill()
                worker.process.wait()


async def _wait_for_health(worker: LocalWorker, token: str | None, timeout: float) -> None:
    from meshllm.transport.stage_client import StageClient, TokenRefused

    name, address = worker.address.name, worker.address.address
    deadline = time.monotonic() + timeout
    client = StageClient(name, address, token)
    try:
        while True:
            code = worker.process.poll()
            if code is not None:
                raise StageError(
                    f"device '{name}': the local worker exited during start (exit code {code}); see its output above"
                )
            try:
                await client.health(timeout=1.0)
                log.info("%s is healthy on %s", name, address)
                return
            except TokenRefused:
                raise
            except StageError:
                pass  # not listening yet
            if time.monotonic() > deadline:
                raise StageError(f"device '{name}' ({address}) did not answer Health within {timeout:.0f} s")
            await asyncio.sleep(0.2)
    finally:
        await client.close()


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct ports nothing listens on now (all held open together, so none repeats)."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(_family(host), socket.SOCK_STREAM))
            sock.bind((host, 0))
            ports.append(sock.getsockname()[1])
        return ports


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


# Run by the new process before it becomes the worker: ask the kernel for SIGTERM when its parent dies
# (kept across exec), make sure the parent did not die already, then exec the worker in the same pid.
_EXEC_DYING_WITH_PARENT = f"""
import ctypes, os, signal, sys
ctypes.CDLL(None, use_errno=True).prctl({PR_SET_PDEATHSIG}, signal.SIGTERM)
if os.getppid() != int(sys.argv[1]):
    sys.exit(1)
os.execv(sys.executable, [sys.executable] + sys.argv[2:])
"""


def _dying_with_this_process(python_args: list[str]) -> list[str]:
    """`python ARGS`, which on Linux also gets SIGTERM when this process dies, however it dies (SIGKILL)."""
    if not sys.platform.startswith("linux"):
        return [sys.executable, *python_args]
    return [sys.executable, "-c", _EXEC_DYING_WITH_PARENT, str(os.getpid()), *python_args]
