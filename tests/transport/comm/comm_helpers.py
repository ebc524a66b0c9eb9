"""What the communicator's tests share: groups of ranks as threads of the test process, and as processes.

- `start_group` / `on_every_rank`: ranks as threads of the test process, each with its own Communicator
  (own gRPC server and streams, all on 127.0.0.1).
- `Cluster`: N OS processes that each run comm_rank_worker.py, build a Communicator, and then run named
  scenarios on request (one JSON line on stdin per request, one JSON line back on stdout). Every scenario
  checks its own results on its rank (see the worker), and returns what the test compares across ranks.
  conftest.py keeps one cluster per world size for the whole session, so each pays its start-up once.

Messages travel over framed links unless `MESHLLM_LINKS=0` (`Cluster(links=...)` per rank; for ranks as
threads, the environment of the test process).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from meshllm.runtime.local_workers import free_ports
from meshllm.transport.comm import Communicator
from meshllm.transport.frames import LINKS_ENV

WORKER = Path(__file__).with_name("comm_rank_worker.py")


def loopback_addresses(count: int) -> list[str]:
    return [f"127.0.0.1:{port}" for port in free_ports(count, host="127.0.0.1")]


# ---------------------------------------------------------------------------------------------------------
# Ranks as threads


def start_group(world_size: int, **kwargs: Any) -> list[Communicator]:
    """`world_size` communicators in this process, built at once (each waits for the others). Ports are
    chosen free before the ranks bind them, and a port another socket took meanwhile (the ranks' own
    link listeners take ephemeral ports too) makes the group start again on new ones, twice at most."""
    for attempt in range(3):
        addresses = loopback_addresses(world_size)
        with concurrent.futures.ThreadPoolExecutor(world_size) as pool:
            futures = [
                pool.submit(Communicator, rank, world_size, addresses, **{"timeout": 10.0, **kwargs})
                for rank in range(world_size)
            ]
        failed = [future for future in futures if future.exception() is not None]
        if not failed:
            return [future.result() for future in futures]
        for future in futures:
            if future.exception() is None:
                future.result().close()
        taken = any("cannot listen on" in str(future.exception()) for future in failed)
        if not taken or attempt == 2:
            failed[0].result()  # raises the first rank's error
    raise AssertionError("unreachable")


def on_every_rank(comms: list[Communicator], work: Any) -> list[Any]:
    """Run `work(comm)` on every rank at once; the results by rank (the first error is raised)."""
    with concurrent.futures.ThreadPoolExecutor(len(comms)) as pool:
        return [future.result() for future in [pool.submit(work, comm) for comm in comms]]


# ---------------------------------------------------------------------------------------------------------
# Ranks as processes


class RankFailed(AssertionError):
    pass


class Cluster:
    """`world_size` rank processes on 127.0.0.1, each waiting for scenarios to run."""

    def __init__(
        self,
        world_size: int,
        logs: Path,
        *,
        timeout: float = 20.0,
        ring_threshold: int = 256,
        tokens: list[str | None] | None = None,
        tls: list[list[str] | None] | None = None,
        wait_ready: bool = True,
        links: list[bool] | None = None,
    ) -> None:
        self.world_size = world_size
        self.addresses = loopback_addresses(world_size)
        self.logs = logs  # each rank's stderr, shown when it fails
        self.processes: list[subprocess.Popen[str]] = []
        self.replies: list[queue.Queue[dict[str, Any]]] = []
        for rank in range(world_size):
            command = [
                sys.executable, str(WORKER), "--rank", str(rank), "--addresses", ",".join(self.addresses),
                "--timeout", str(timeout), "--ring-threshold", str(ring_threshold),
            ]  # fmt: skip
            token = tokens[rank] if tokens else None
            if token:
                command += ["--token", token]
            files = tls[rank] if tls else None
            if files:  # the rank's CA, certificate and key
                command += ["--tls-ca", files[0], "--tls-cert", files[1], "--tls-key", files[2]]
            env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
            env[LINKS_ENV] = "1" if links is None or links[rank] else "0"  # "0": this rank takes no links
            stderr = open(self.logs / f"rank{rank}.log", "w")  # noqa: SIM115 (the process owns it)
            process = subprocess.Popen(
                command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env
            )
            stderr.close()
            replies: queue.Queue[dict[str, Any]] = queue.Queue()
            threading.Thread(target=self._read, args=(process, replies), daemon=True).start()
            self.processes.append(process)
            self.replies.append(replies)
        if wait_ready:
            for rank, ready in enumerate(self.collect(range(world_size), timeout + 30)):
                if not ready.get("ok"):
                    self.close()
                    raise RankFailed(
                        f"rank {rank} did not start: {ready.get('error')}\n{self.log_tail(rank)}"
                    )

    @staticmethod
    def _read(process: subprocess.Popen[str], replies: queue.Queue[dict[str, Any]]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            if line.startswith("{"):
                replies.put(json.loads(line))
        replies.put({"ok": False, "error": f"the process exited (code {process.wait()})", "exited": True})

    def log_tail(self, rank: int) -> str:
        text = (self.logs / f"rank{rank}.log").read_text(errors="replace")
        return text[-2000:]

    def start(self, scenario: str, ranks: list[int] | None = None, **kwargs: Any) -> None:
        """Ask `ranks` (default: all) to run `scenario(comm, **kwargs)`; replies are read by `collect`."""
        line = json.dumps({"scenario": scenario, "args": kwargs}) + "\n"
        for rank in range(self.world_size) if ranks is None else ranks:
            stdin = self.processes[rank].stdin
            assert stdin is not None
            stdin.write(line)
            stdin.flush()

    def collect(self, ranks: Any, timeout: float) -> list[dict[str, Any]]:
        """The next reply of each of `ranks`, waiting up to `timeout` seconds in all."""
        deadline = time.monotonic() + timeout
        replies = []
        for rank in ranks:
            try:
                replies.append(self.replies[rank].get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                raise RankFailed(
                    f"rank {rank} gave no reply within {timeout} s\n{self.log_tail(rank)}"
                ) from None
        return replies

    def run(self, scenario: str, timeout: float = 60.0, **kwargs: Any) -> list[Any]:
        """Run `scenario` on every rank; the results by rank, or RankFailed with every rank's error."""
        self.start(scenario, **kwargs)
        replies = self.collect(range(self.world_size), timeout)
        errors = [f"rank {rank}: {reply['error']}" for rank, reply in enumerate(replies) if not reply["ok"]]
        if errors:
            raise RankFailed(f"{scenario}({kwargs}) failed:\n" + "\n".join(errors))
        return [reply["result"] for reply in replies]

    def kill(self, rank: int) -> None:
        os.kill(self.processes[rank].pid, signal.SIGKILL)
        self.processes[rank].wait()

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None and process.stdin is not None:
                try:
                    process.stdin.close()  # the rank closes its communicator and exits
                except OSError:
                    pass
        deadline = time.monotonic() + 10
        for process in self.processes:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def assert_same_everywhere(digests: list[Any]) -> None:
    assert all(digest == digests[0] for digest in digests), f"ranks disagree: {digests}"
