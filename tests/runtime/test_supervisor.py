"""`meshllm supervise`: a command that keeps exiting is started again after a backoff that doubles
(1 s, 2 s, 4 s …), each exit written to the status file with its status and the end of its output; a
SIGTERM stops the supervisor and its child, and the status file says so."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from meshllm.devices import SupervisorReport


def read_report(path: Path) -> SupervisorReport | None:
    try:
        return SupervisorReport.model_validate(json.loads(path.read_text()))
    except (OSError, ValueError):
        return None


def wait_for(path: Path, condition, timeout: float = 60.0) -> SupervisorReport:
    deadline = time.monotonic() + timeout
    while True:
        report = read_report(path)
        if report is not None and condition(report):
            return report
        assert time.monotonic() < deadline, f"timed out; last report: {report}"
        time.sleep(0.05)


def supervise(tmp_path: Path, command: list[str]) -> tuple[subprocess.Popen, Path]:
    status, log = tmp_path / "status.json", tmp_path / "worker.log"
    with log.open("ab") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "meshllm", "supervise", "--name", "w1"]
            + ["--status-file", str(status), "--log", str(log), "--", *command],
            stdout=output,
            stderr=output,
            start_new_session=True,
        )
    return process, status


def test_a_command_that_keeps_exiting_is_restarted_with_a_doubling_backoff(tmp_path: Path) -> None:
    process, status = supervise(tmp_path, ["sh", "-c", "echo 'cannot bind port 1234'; exit 3"])
    try:
        restarts = []  # (exit time, next start) of the first three exits
        for exits in (1, 2, 3):
            waiting = wait_for(status, lambda r, n=exits: r.exits == n and r.state == "waiting")
            assert waiting.last_exit is not None and waiting.next_start_at is not None
            restarts.append((waiting.last_exit.at, waiting.next_start_at))
        report = wait_for(status, lambda r: r.exits == 3)
        assert report.last_exit is not None
        assert report.last_exit.how == "status 3"
        assert report.last_exit.log_tail == ["cannot bind port 1234"]  # the child's own output only
        assert [round(start - exited, 1) for exited, start in restarts] == [1.0, 2.0, 4.0]
        assert "exited 3 times, last with status 3" in report.problem()
        assert report.problem().endswith("its last line: cannot bind port 1234")
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_sigterm_stops_the_supervisor_and_its_child(tmp_path: Path) -> None:
    process, status = supervise(tmp_path, [sys.executable, "-c", "import time; time.sleep(600)"])
    running = wait_for(status, lambda r: r.state == "running")
    assert running.worker_pid is not None and running.supervisor_pid == process.pid
    os.killpg(process.pid, signal.SIGTERM)  # as `cluster stop` does: the whole process group
    assert process.wait(timeout=30) == 0
    assert wait_for(status, lambda r: r.state == "stopped").exits == 0
    child_gone = subprocess.run(["ps", "-o", "stat=", "-p", str(running.worker_pid)], capture_output=True)
    assert child_gone.stdout.strip() in (b"", b"Z")


def test_a_child_dies_with_its_supervisor_when_that_is_killed(tmp_path: Path) -> None:
    process, status = supervise(tmp_path, [sys.executable, "-c", "import time; time.sleep(600)"])
    running = wait_for(status, lambda r: r.state == "running")
    assert running.worker_pid is not None
    process.kill()  # SIGKILL to the supervisor alone
    process.wait(timeout=30)
    deadline = time.monotonic() + 30
    while subprocess.run(
        ["ps", "-o", "stat=", "-p", str(running.worker_pid)], capture_output=True
    ).stdout.strip() not in (b"", b"Z"):
        assert time.monotonic() < deadline, "the child outlived its supervisor"
        time.sleep(0.1)
