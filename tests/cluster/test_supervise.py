"""Workers started by `cluster start` run under `meshllm supervise` on their host: a worker killed by
hand is started again there with no command run, and the coordinator loads it again; one that keeps
dying is shown by `/health` and `cluster status` with its last exit; `cluster stop` stops supervisor and worker."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import httpx
import pytest
from cluster_helpers import is_running, meshllm, pid_record, status_rows, wait_until

from meshllm.config import load_cluster

pytestmark = pytest.mark.slow


def report(path: Path, device: str) -> dict:
    return json.loads(Path(pid_record(path, device)["status_file"]).read_text())


def health_message(path: Path) -> str:
    reply = httpx.get(f"{load_cluster(path).api_url}/health", timeout=10)
    return reply.json().get("message", "") if reply.status_code == 503 else ""


def kill_worker(path: Path, device: str) -> int:
    """SIGKILL the device's worker (not its supervisor) once it runs, and wait until the supervisor has
    counted the exit; the killed worker's pid."""
    exits = report(path, device)["exits"]
    wait_until(lambda: report(path, device)["state"] == "running", timeout=120)
    pid = report(path, device)["worker_pid"]
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: report(path, device)["exits"] == exits + 1)
    return pid


def test_a_killed_worker_comes_back_by_itself_and_one_that_keeps_dying_is_shown(cluster_files) -> None:
    path = cluster_files.local(workers=1, name="supervised")
    started = meshllm("cluster", "start", "-c", path)
    assert started.returncode == 0, str(started)
    supervisor = pid_record(path, "w1")["pid"]

    first = kill_worker(path, "w1")
    wait_until(lambda: report(path, "w1")["exits"] == 1 and report(path, "w1")["state"] == "running")
    assert report(path, "w1")["worker_pid"] != first
    assert pid_record(path, "w1")["pid"] == supervisor  # the same supervisor, no command run
    wait_until(lambda: status_rows(path)["w1"][4] == "healthy", timeout=180)  # the coordinator reloaded it
    assert meshllm("cluster", "test", "-c", path, "--max-tokens", "4").returncode == 0

    kill_worker(path, "w1")
    kill_worker(path, "w1")
    # the third exit waits 4 s (1 s, 2 s, 4 s) before the next start: /health says how it exited
    wait_until(lambda: "the worker exited 3 times, last with signal SIGKILL" in health_message(path), 30)
    last = report(path, "w1")
    assert last["exits"] == 3 and last["last_exit"]["how"] == "signal SIGKILL"
    status = meshllm("cluster", "status", "-c", path)
    assert "device 'w1': the worker exited 3 times, last with signal SIGKILL" in status.stdout, status
    assert status_rows(path)["w1"][4] in ("restarting", "not loaded", "unreachable", "healthy")
    wait_until(lambda: status_rows(path)["w1"][4] == "healthy", timeout=180)

    status_file, worker = Path(pid_record(path, "w1")["status_file"]), report(path, "w1")["worker_pid"]
    stopped = meshllm("cluster", "stop", "-c", path)
    assert stopped.returncode == 0, str(stopped)
    assert not is_running(supervisor) and not is_running(worker)
    assert json.loads(status_file.read_text())["state"] == "stopped"

    # The next start is not confused by the old supervisor's report of three exits.
    again = meshllm("cluster", "start", "-c", path)
    assert again.returncode == 0, str(again)
    assert report(path, "w1")["exits"] == 0
    assert "exited" not in meshllm("cluster", "status", "-c", path).stdout
