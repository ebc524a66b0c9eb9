"""What runs on each machine (`hostscript`): port holders, detached starts, stops by process group, log
tails."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from cluster_helpers import free_port, is_running

from meshllm.cluster import hostscript

# A stand-in for a meshllm process: `stop` only signals command lines that mention meshllm.
SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)", "meshllm-test"]
STUBBORN = [
    sys.executable,
    "-c",
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(60)",
    "meshllm-test",
]


def test_a_port_held_by_a_listening_socket_names_this_process() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        state = hostscript.port_state(holder.getsockname()[1], "127.0.0.1")
    assert not state["free"]
    assert state["holders"][0]["pid"] == os.getpid()
    assert "python" in state["holders"][0]["command"]


def test_a_free_port_is_free() -> None:
    assert hostscript.port_state(free_port(), "127.0.0.1") == {"free": True, "holders": []}


def test_launch_detaches_into_its_own_session_and_stop_ends_it(tmp_path: Path) -> None:
    started = hostscript.launch(SLEEPER, str(tmp_path), "logs/sleeper.log")
    pid = started["pid"]
    try:
        assert os.getsid(pid) == pid  # its own session: no SIGHUP when the terminal or ssh goes
        assert started["log"] == str(tmp_path / "logs" / "sleeper.log")
        assert hostscript.is_ours(pid)
        assert hostscript.stop(pid, timeout=5)["state"] == "stopped"
        assert not is_running(pid)
    finally:
        hostscript.stop(pid, timeout=1)


def test_stop_escalates_to_sigkill_after_the_grace_period(tmp_path: Path) -> None:
    started = hostscript.launch(STUBBORN, str(tmp_path), "stubborn.log")
    pid = started["pid"]
    deadline = time.monotonic() + 10
    while "ready" not in Path(started["log"]).read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    began = time.monotonic()
    assert hostscript.stop(pid, timeout=1.0)["state"] == "killed"
    assert 1.0 <= time.monotonic() - began < 5
    assert not is_running(pid)


def test_stop_never_signals_a_process_that_is_not_meshllm() -> None:
    stranger = subprocess.Popen(["sleep", "30"])
    try:
        assert hostscript.stop(stranger.pid, timeout=1)["state"] == "not running"
        assert stranger.poll() is None
    finally:
        stranger.kill()
        stranger.wait()


def test_a_zombie_counts_as_gone() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 10
    while hostscript.is_alive(child.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not hostscript.is_alive(child.pid)  # exited, and not reaped yet
    child.wait()


def test_launch_writes_files_for_this_user_only_and_keeps_the_previous_log(tmp_path: Path) -> None:
    (tmp_path / "run.log").write_text("earlier\n")
    started = hostscript.launch(
        [sys.executable, "-c", "print('hello')"], str(tmp_path), "run.log", files={"secret/token": "abc\n"}
    )
    deadline = time.monotonic() + 10
    while "hello" not in Path(started["log"]).read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (tmp_path / "run.log.1").read_text() == "earlier\n"
    assert (tmp_path / "secret" / "token").stat().st_mode & 0o777 == 0o600


def test_launch_of_a_missing_program_says_which() -> None:
    assert "/nowhere/python" in hostscript.launch(["/nowhere/python"], "/tmp", "/tmp/never.log")["error"]


def test_tail_prints_the_last_lines(tmp_path: Path) -> None:
    log = tmp_path / "x.log"
    log.write_text("".join(f"line {index}\n" for index in range(10)))
    out = io.StringIO()
    hostscript.tail(str(log), lines=3, out=out)
    assert out.getvalue() == "line 7\nline 8\nline 9\n"


def test_signals_reach_the_whole_process_group(tmp_path: Path) -> None:
    parent = [
        sys.executable,
        "-c",
        "import subprocess, sys, time; child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']);"
        " print(child.pid, flush=True); time.sleep(60)",
        "meshllm-test",
    ]
    started = hostscript.launch(parent, str(tmp_path), "group.log")
    deadline = time.monotonic() + 10
    while not Path(started["log"]).read_text().strip() and time.monotonic() < deadline:
        time.sleep(0.05)
    child = int(Path(started["log"]).read_text().split()[0])
    try:
        hostscript.stop(started["pid"], timeout=5)
        deadline = time.monotonic() + 5
        while is_running(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not is_running(child)
    finally:
        if is_running(child):
            os.kill(child, signal.SIGKILL)
