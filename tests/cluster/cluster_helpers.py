"""Helpers of the cluster tests: writing cluster files, running `meshllm cluster ...` as a user would
(a separate process), reading pid files, a stand-in for the coordinator's HTTP API, and a private sshd
on 127.0.0.1."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

SSHD_PATHS = ("/usr/sbin/sshd", "/usr/local/sbin/sshd")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class CliResult:
    returncode: int
    stdout: str
    stderr: str

    @property
    def error(self) -> str:
        """The error message of a failed command, continuation lines joined with single spaces."""
        return " ".join(line.strip() for line in self.stderr.splitlines())

    def __str__(self) -> str:
        return f"exit {self.returncode}\n--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}"


def meshllm(*args: str | Path, timeout: float = 180.0, env: dict[str, str] | None = None) -> CliResult:
    """Run `meshllm ARGS` in its own process, as a user would from a shell."""
    completed = subprocess.run(
        [sys.executable, "-m", "meshllm", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    return CliResult(completed.returncode, completed.stdout, completed.stderr)


def start_fails(path: Path, *extra: str) -> str:
    """The one-line error of a `cluster start` that must fail."""
    result = meshllm("cluster", "start", "-c", path, *extra)
    assert result.returncode == 1, result
    assert result.stderr.startswith("error: "), result
    return result.error


def coordinator_device(**keys: Any) -> dict[str, Any]:
    """A [[device]] table: the coordinator on 127.0.0.1 with one compute thread."""
    return {"name": "coordinator", "host": "127.0.0.1", "threads": 1, **keys}


def worker_device(name: str = "w1", **keys: Any) -> dict[str, Any]:
    """A [[device]] table: a worker on 127.0.0.1 on a free port with one compute thread."""
    return {"name": name, "host": "127.0.0.1", "port": free_port(), "threads": 1, **keys}


class FakeApi:
    """An HTTP server on 127.0.0.1:port standing in for the coordinator's API: GET `path` answers the
    JSON of `routes[path]` with status 200, anything else 404."""

    def __init__(self, port: int, routes: dict[str, Any]) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # the name http.server calls
                found = self.path in routes
                body = json.dumps(routes.get(self.path, {"error": "not found"})).encode()
                self.send_response(200 if found else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # quiet
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


def status_rows(path: Path) -> dict[str, list[str]]:
    """`meshllm cluster status`'s table: the words of each device's row, by device name."""
    result = meshllm("cluster", "status", "-c", path)
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["device", "host", "role", "pid", "state", "layers", "memory", "rtt"], result
    return {line.split()[0]: line.split() for line in lines[1:] if not line.startswith("API")}


def wait_until(condition: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.3)


def toml_value(value: Any) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{key} = {toml_value(item)}" for key, item in value.items()) + " }"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    if isinstance(value, Path):
        value = str(value)
    return json.dumps(value)  # strings, numbers and booleans are written alike in JSON and TOML


def write_cluster_file(path: Path, cluster: dict[str, Any], devices: list[dict[str, Any]]) -> Path:
    lines = ["[cluster]", *(f"{key} = {toml_value(value)}" for key, value in cluster.items())]
    for device in devices:
        lines += ["", "[[device]]", *(f"{key} = {toml_value(value)}" for key, value in device.items())]
    path.write_text("\n".join(lines) + "\n")
    return path


def pid_record(cluster_file: Path, device: str) -> dict[str, Any]:
    """The pid file `start` wrote for a device (state folder: .meshllm/<name> next to the file)."""
    [path] = cluster_file.parent.glob(f".meshllm/*/pids/{device}.json")
    return json.loads(path.read_text())


def is_running(pid: int) -> bool:
    """True while pid runs (a zombie waiting to be reaped counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def sshd_binary() -> str:
    """The sshd to run, or skip (fail under CI, where .ci/run installs openssh-server) with the reason."""
    found = shutil.which("sshd") or next((path for path in SSHD_PATHS if os.access(path, os.X_OK)), None)
    missing = "sshd" if found is None else "ssh" if shutil.which("ssh") is None else None
    if missing:
        reason = f"no {missing} binary on this machine (install openssh-server and openssh-client)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI must run the ssh tests")
        pytest.skip(reason)
    return found


@dataclass
class SshServer:
    """An sshd on 127.0.0.1:port that lets `key` (not `other_key`) log in as this user."""

    process: subprocess.Popen
    port: int
    user: str
    key: Path
    other_key: Path
    log: Path

    @property
    def target(self) -> str:
        return f"{self.user}@127.0.0.1"

    def device(self, **keys: Any) -> dict[str, Any]:
        """The ssh keys of a [[device]] that reaches this server."""
        return {
            "ssh": self.target,
            "ssh_port": self.port,
            "ssh_key": str(self.key),
            "ssh_options": ["StrictHostKeyChecking=no", "UserKnownHostsFile=/dev/null", "LogLevel=ERROR"],
            **keys,
        }


def start_sshd(folder: Path) -> SshServer:
    binary = sshd_binary()
    for name in ("host_key", "client_key", "other_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(folder / name)], check=True)
    (folder / "authorized_keys").write_text((folder / "client_key.pub").read_text())
    port = free_port()
    config = folder / "sshd_config"
    config.write_text(
        f"""Port {port}
ListenAddress 127.0.0.1
HostKey {folder / "host_key"}
AuthorizedKeysFile {folder / "authorized_keys"}
PidFile {folder / "sshd.pid"}
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
StrictModes no
UsePAM no
"""
    )
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation folder
    log = folder / "sshd.log"
    process = subprocess.Popen(
        [binary, "-D", "-e", "-f", str(config)], stdout=subprocess.DEVNULL, stderr=log.open("wb")
    )
    import getpass

    server = SshServer(process, port, getpass.getuser(), folder / "client_key", folder / "other_key", log)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        probe = subprocess.run(
            ["ssh", "-i", str(server.key), "-p", str(port), "-o", "BatchMode=yes"]
            + ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR"]
            + [server.target, "true"],
            capture_output=True,
        )
        if probe.returncode == 0:
            return server
        time.sleep(0.2)
    process.kill()
    process.wait()
    pytest.fail(f"the test sshd did not accept a login; its log:\n{log.read_text()}")
