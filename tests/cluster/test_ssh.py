"""The ssh path for real: a private sshd on 127.0.0.1 stands for the second machine. A worker reached over
ssh starts, serves and stops; ssh that refuses, a key that is not accepted and a `python` that is not
there are each said in one line. Without an sshd binary these skip, except under CI (env CI), where
they fail: .ci/run installs openssh-server."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from cluster_helpers import SshServer, free_port, is_running, meshllm, pid_record, port_is_free

from meshllm.config import load_cluster

pytestmark = pytest.mark.slow


def coordinator() -> dict:
    return {"name": "coordinator", "host": "127.0.0.1", "threads": 1}


def ssh_worker(sshd: SshServer, workdir: Path, **keys) -> dict:
    defaults = {
        "name": "remote",
        "host": "127.0.0.1",
        "port": free_port(),
        "python": sys.executable,  # the virtualenv's, as `python = "~/meshllm/.venv/bin/python"` would be
        "workdir": str(workdir),
        "threads": 1,
    }
    return sshd.device(**{**defaults, **keys})


def start_fails(path: Path) -> str:
    result = meshllm("cluster", "start", "-c", path)
    assert result.returncode == 1, result
    return result.error


def test_a_worker_over_ssh_starts_serves_and_stops(cluster_files, sshd: SshServer, tmp_path: Path) -> None:
    workdir = tmp_path / "remote-home"
    path = cluster_files.write([coordinator(), ssh_worker(sshd, workdir)], name="viassh")
    started = meshllm("cluster", "start", "-c", path)
    assert started.returncode == 0, started
    assert "checking remote … ssh ok · python" in started.stdout

    record = pid_record(path, "remote")
    assert record["machine"]["ssh"] == sshd.target
    assert record["log"] == str(workdir / ".meshllm" / "viassh" / "logs" / "remote.log")
    assert is_running(record["pid"])  # the sshd is on this machine, so its processes are visible here

    chat = meshllm("cluster", "test", "-c", path, "--max-tokens", "4")
    assert chat.returncode == 0, chat
    status = meshllm("cluster", "status", "-c", path)
    assert status.returncode == 0, status
    remote_row = next(line.split() for line in status.stdout.splitlines() if line.startswith("remote"))
    assert remote_row[4] == "healthy"
    logs = meshllm("cluster", "logs", "remote", "-c", path, "-n", "3")  # read over ssh
    assert "[worker remote]" in logs.stdout, logs

    stopped = meshllm("cluster", "stop", "-c", path)
    assert stopped.returncode == 0, stopped
    assert not is_running(record["pid"])
    assert port_is_free(load_cluster(path).get("remote").port)
    assert port_is_free(load_cluster(path).cluster.api_port)


def test_ssh_that_refuses_the_connection_says_to_start_the_ssh_server(
    cluster_files, sshd: SshServer, tmp_path: Path
) -> None:
    closed = free_port()
    path = cluster_files.write([coordinator(), ssh_worker(sshd, tmp_path, ssh_port=closed)])
    error = start_fails(path)
    assert f"device 'remote': ssh to {sshd.target} was refused: no ssh server answers on 127.0.0.1" in error


def test_ssh_that_wants_a_password_says_to_install_a_key(
    cluster_files, sshd: SshServer, tmp_path: Path
) -> None:
    path = cluster_files.write([coordinator(), ssh_worker(sshd, tmp_path, ssh_key=str(sshd.other_key))])
    error = start_fails(path)
    assert f"device 'remote': ssh to {sshd.target} asks for a password or refuses the key" in error
    assert f"install a key with `ssh-copy-id {sshd.target}`" in error


def test_a_python_missing_over_ssh_asks_for_the_python_key(
    cluster_files, sshd: SshServer, tmp_path: Path
) -> None:
    path = cluster_files.write([coordinator(), ssh_worker(sshd, tmp_path, python="/nowhere/bin/python")])
    error = start_fails(path)
    assert (
        f"device 'remote': `python` not found on {sshd.target} over ssh (tried '/nowhere/bin/python')"
        in error
    )
    assert re.search(rf'; set python = "[^"]+/python[0-9.]*" for remote in {re.escape(str(path))}$', error)


def test_a_host_whose_name_does_not_resolve_is_unreachable(
    cluster_files, sshd: SshServer, tmp_path: Path
) -> None:
    device = {
        "name": "far",
        "ssh": "nobody@no-such-host.invalid",
        "port": free_port(),
        "workdir": str(tmp_path),
    }
    error = start_fails(cluster_files.write([coordinator(), device]))
    assert "device 'far': host 'no-such-host.invalid' is unreachable" in error
