"""A worker kept alive on its own machine: `meshllm supervise` runs the worker as its child, and when
the worker exits starts it again after a backoff that doubles while it keeps dying (1 s up to 30 s,
`runtime/backoff.py`). Every change is written to a status file (a `SupervisorReport`: the state, the
number of exits, the last one's status and the end of the log), which `cluster status` and the
coordinator read.

The supervisor and its worker share one process group (the one `cluster start` made), so `cluster stop`
stops both with one signal; on SIGTERM the supervisor starts nothing more and waits for the worker.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from meshllm.devices import SupervisorReport, WorkerExit
from meshllm.runtime.backoff import Backoff

log = logging.getLogger(__name__)

TAIL_LINES = 12  # lines of the log kept with each exit
POLL_S = 0.2
STOP_GRACE_S = 10.0
PR_SET_PDEATHSIG = 1  # prctl option: the signal a process gets when its parent dies  # seconds the worker has to exit after SIGTERM before it is killed


@dataclass
class Supervisor:
    name: str
    argv: list[str]  # the worker's command line
    status_file: Path
    log_file: Path | None = None  # where the worker's output goes (for the tail kept with each exit)
    backoff: Backoff = field(default_factory=Backoff)
    exits: int = 0
    last_exit: WorkerExit | None = None
    _stopping: bool = False

    def run(self) -> int:
        """Run the worker until SIGTERM or SIGINT; returns 0."""
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        while not self._stopping:
            log.info("starting the worker %s", self.name)
            start_offset = self._log_size()  # the tail kept with an exit is the worker's own output
            process = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
            self.backoff.succeeded()
            self._write("running", worker_pid=process.pid)
            code = self._wait(process)
            if self._stopping:
                break
            delay = self.backoff.delay()
            self.exits += 1
            self.last_exit = WorkerExit(pid=process.pid, how=describe_exit(code), at=time.time(),
                                        log_tail=self._log_tail(start_offset))  # fmt: skip
            log.warning(
                "the worker %s (pid %d) exited with %s; starting it again in %.0f s",
                self.name, process.pid, self.last_exit.how, delay,
            )  # fmt: skip
            self._write("waiting", next_start_at=time.time() + delay)
            self._sleep(delay)
        self._write("stopped")
        return 0

    def _wait(self, process: subprocess.Popen[bytes]) -> int:
        """The worker's exit code; on a stop, SIGTERM to it (SIGKILL after the grace period)."""
        stop_sent: float | None = None
        while True:
            code = process.poll()
            if code is not None:
                return code
            if self._stopping:
                now = time.monotonic()
                if stop_sent is None:
                    stop_sent = now
                    process.terminate()
                elif now - stop_sent > STOP_GRACE_S:
                    process.kill()
            time.sleep(POLL_S)

    def _sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self._stopping and time.monotonic() < deadline:
            time.sleep(POLL_S)

    def _stop(self, signum: int, frame: object) -> None:
        self._stopping = True

    def _log_size(self) -> int:
        try:
            return os.path.getsize(self.log_file) if self.log_file else 0
        except OSError:
            return 0

    def _log_tail(self, start: int) -> list[str]:
        """The last lines the worker wrote to the log since `start` (its offset when the worker started)."""
        if self.log_file is None:
            return []
        try:
            with open(self.log_file, "rb") as handle:
                size = os.fstat(handle.fileno()).st_size
                start = start if start <= size else 0  # the log was replaced meanwhile
                handle.seek(max(start, size - 16384))
                text = handle.read().decode(errors="replace")
        except OSError:
            return []
        return [line for line in text.splitlines() if line.strip()][-TAIL_LINES:]

    def _write(self, state: str, worker_pid: int | None = None, next_start_at: float | None = None) -> None:
        report = SupervisorReport(
            name=self.name,
            supervisor_pid=os.getpid(),
            worker_pid=worker_pid,
            state=state,  # type: ignore[arg-type]  # one of the three literals, by the callers above
            exits=self.exits,
            last_exit=self.last_exit,
            next_start_at=next_start_at,
            updated_at=time.time(),
        )
        self.status_file.parent.mkdir(parents=True, exist_ok=True)
        partial = self.status_file.with_suffix(".partial")
        partial.write_text(report.model_dump_json(indent=2) + "\n")
        partial.replace(self.status_file)


def read_report(path: str | Path) -> SupervisorReport | None:
    """The report in a status file; None when it is missing or half-written."""
    try:
        return SupervisorReport.model_validate_json(Path(os.path.expanduser(str(path))).read_text())
    except (OSError, ValueError):
        return None


async def watch_reports(
    files: dict[str, str], note: Callable[[str, str], None], interval: float = 1.0
) -> None:
    """Tell `note(name, message)` (the coordinator's monitor) of each exit of a supervised worker, and
    of each backoff it waits; runs until cancelled."""
    seen: dict[str, int] = {}
    while files:
        for name, path in files.items():
            report = read_report(path)
            if report is None or not report.exits or report.state == "stopped":
                continue
            if report.state == "waiting" or report.exits > seen.get(name, 0):
                note(name, report.problem())
            seen[name] = report.exits
        await asyncio.sleep(interval)


def _die_with_parent() -> None:
    """In the new worker process, before it runs: on Linux, SIGTERM when the supervisor dies, however
    it dies (a worker without its supervisor would hold the port with nobody to restart it)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def describe_exit(code: int) -> str:
    """'status 1' or 'signal SIGKILL' for a process's exit code."""
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"status {code}"
