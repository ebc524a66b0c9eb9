"""Where a device's processes run and how they are reached (`launch.Machine`): this machine, or another
one over ssh. A private sshd on 127.0.0.1 stands for the second machine: a worker reached over ssh
starts, serves and stops; ssh that refuses, a key that is not accepted, a `python` that is not there
and a host whose name does not resolve are each said in one line. Without an sshd binary the ssh tests
skip, except under CI (env CI), where they fail: .ci/run installs openssh-server."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
from pathlib import Path

import pytest
from cluster_helpers import (
    SshServer,
    coordinator_device,
    free_port,
    is_running,
    meshllm,
    pid_record,
    port_is_free,
    start_fails,
    status_rows,
    wait_until,
    worker_device,
)

from meshllm import __version__
from meshllm.cluster.launch import Machine, shell_word
from meshllm.config import load_cluster
from meshllm.errors import ConfigError


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


# -- this machine ---------------------------------------------------------------------------------


def test_the_probe_runs_under_the_devices_python_and_reports_meshllm(tmp_path: Path) -> None:
    port = free_port()
    facts = Machine("w1", "c.toml", sys.executable).run_script(
        "probe", {"workdir": str(tmp_path), "model": "missing-folder/x/y", "port": port, "bind": "127.0.0.1"}
    )
    assert facts["meshllm"] == __version__
    assert facts["port"]["free"]
    assert facts["model"] == {
        "kind": "folder",
        "path": str(tmp_path / "missing-folder/x/y"),
        "exists": False,
        "checkpoint": False,
    }


def test_a_missing_python_names_the_device_and_the_key_to_set() -> None:
    with pytest.raises(ConfigError) as caught:
        Machine("w1", "cluster.toml", "/nowhere/bin/python").run_script("probe", {"workdir": "/tmp"})
    assert str(caught.value) == (
        "device 'w1': `python` not found on this machine (tried '/nowhere/bin/python'); "
        f'set python = "{sys.executable}" for w1 in cluster.toml'
    )


def test_a_python_that_does_not_exist_asks_for_the_python_key(cluster_files) -> None:
    path = cluster_files.write([coordinator_device(), worker_device(python="/nowhere/bin/python")])
    error = start_fails(path)
    assert "device 'w1': `python` not found on this machine (tried '/nowhere/bin/python')" in error
    assert f'set python = "{sys.executable}" for w1 in {path}' in error


# -- over ssh ----------------------------------------------------------------------------------------


def test_ssh_commands_keep_a_leading_tilde_for_the_remote_shell() -> None:
    assert shell_word("~/meshllm/.venv/bin/python") == "~/meshllm/.venv/bin/python"
    assert shell_word("/opt/my python/bin/python") == "'/opt/my python/bin/python'"
    machine = Machine("w1", "c.toml", "~/venv/bin/python", ssh="me@mini2", ssh_port=2222, env={"A": "b c"})
    argv = machine.python_argv()
    assert (
        argv[:1] == ["ssh"]
        and "BatchMode=yes" in argv
        and argv[-2:] == ["me@mini2", "env 'A=b c' ~/venv/bin/python -"]
    )
    assert argv[argv.index("-p") + 1] == "2222"


@pytest.mark.slow
def test_a_worker_over_ssh_starts_serves_and_stops(cluster_files, sshd: SshServer, tmp_path: Path) -> None:
    workdir = tmp_path / "remote-home"
    path = cluster_files.write([coordinator_device(), ssh_worker(sshd, workdir)], name="viassh")
    started = meshllm("cluster", "start", "-c", path)
    assert started.returncode == 0, str(started)
    assert "checking remote … ssh ok · python" in started.stdout

    record = pid_record(path, "remote")
    assert record["machine"]["ssh"] == sshd.target
    assert record["log"] == str(workdir / ".meshllm" / "viassh" / "logs" / "remote.log")
    assert is_running(record["pid"])  # the sshd is on this machine, so its processes are visible here

    chat = meshllm("cluster", "test", "-c", path, "--max-tokens", "4")
    assert chat.returncode == 0, str(chat)
    status = meshllm("cluster", "status", "-c", path)
    assert status.returncode == 0, str(status)
    remote_row = next(line.split() for line in status.stdout.splitlines() if line.startswith("remote"))
    assert remote_row[4] == "healthy"
    logs = meshllm("cluster", "logs", "remote", "-c", path, "-n", "3")  # read over ssh
    assert "[worker remote]" in logs.stdout, logs

    # Its supervisor, on that machine, starts it again when it dies; status reads the exit over ssh.
    status_file = Path(record["status_file"])
    assert status_file == workdir / ".meshllm" / "viassh" / "status" / "remote.json"
    worker = json.loads(status_file.read_text())["worker_pid"]
    os.kill(worker, signal.SIGKILL)
    wait_until(lambda: json.loads(status_file.read_text())["exits"] == 1, timeout=60)
    wait_until(lambda: status_rows(path)["remote"][4] == "healthy", timeout=180)
    again = meshllm("cluster", "status", "-c", path)
    assert "device 'remote': the worker exited once, last with signal SIGKILL" in again.stdout, again

    stopped = meshllm("cluster", "stop", "-c", path)
    assert stopped.returncode == 0, str(stopped)
    assert not is_running(record["pid"])
    assert port_is_free(load_cluster(path).get("remote").port)
    assert port_is_free(load_cluster(path).cluster.api_port)


@pytest.mark.slow
def test_ssh_that_refuses_the_connection_says_to_start_the_ssh_server(
    cluster_files, sshd: SshServer, tmp_path: Path
) -> None:
    closed = free_port()
    path = cluster_files.write([coordinator_device(), ssh_worker(sshd, tmp_path, ssh_port=closed)])
    error = start_fails(path)
    assert f"device 'remote': ssh to {sshd.target} was refused: no ssh server answers on 127.0.0.1" in error


@pytest.mark.slow
def test_ssh_that_wants_a_password_says_to_install_a_key(
    cluster_files, sshd: SshServer, tmp_path: Path
) -> None:
    path = cluster_files.write(
        [coordinator_device(), ssh_worker(sshd, tmp_path, ssh_key=str(sshd.other_key))]
    )
    error = start_fails(path)
    assert f"device 'remote': ssh to {sshd.target} asks for a password or refuses the key" in error
    assert f"install a key with `ssh-copy-id {sshd.target}`" in error


@pytest.mark.slow
def test_a_python_missing_over_ssh_asks_for_the_python_key(
    cluster_files, sshd: SshServer, tmp_path: Path
) -> None:
    path = cluster_files.write(
        [coordinator_device(), ssh_worker(sshd, tmp_path, python="/nowhere/bin/python")]
    )
    error = start_fails(path)
    assert (
        f"device 'remote': `python` not found on {sshd.target} over ssh (tried '/nowhere/bin/python')"
        in error
    )
    assert re.search(rf'; set python = "[^"]+/python[0-9.]*" for remote in {re.escape(str(path))}$', error)


@pytest.mark.slow
def test_a_host_whose_name_does_not_resolve_is_unreachable(
    cluster_files, sshd: SshServer, tmp_path: Path
) -> None:
    device = {
        "name": "far",
        "ssh": "nobody@no-such-host.invalid",
        "port": free_port(),
        "workdir": str(tmp_path),
    }
    error = start_fails(cluster_files.write([coordinator_device(), device]))
    assert "device 'far': host 'no-such-host.invalid' is unreachable" in error
