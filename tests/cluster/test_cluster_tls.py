"""Mutual TLS in `meshllm cluster`: start makes a cluster CA and one certificate per device (keys 0600),
hands a device reached over ssh its own copy next to the token, and starts every process with them; the
cluster serves a chat request, `status` asks the workers over TLS, and a plaintext caller is refused.
The file's own certificates are used as given (and checked against the device's host); `insecure = true`
starts in plaintext with a warning; the cluster file's TLS keys are checked; `serve` and `worker` refuse
plaintext beyond loopback unless told --insecure."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from cluster_helpers import (
    SshServer,
    coordinator_device,
    free_port,
    meshllm,
    pid_record,
    start_fails,
    status_rows,
    write_cluster_file,
)

from meshllm.cluster import certs
from meshllm.cluster.state import ClusterState
from meshllm.config import load_cluster
from meshllm.errors import ConfigError
from meshllm.transport.probe import stage_health


def ssh_worker(sshd: SshServer, workdir: Path, **keys) -> dict:
    defaults = {
        "name": "remote",
        "host": "127.0.0.1",
        "port": free_port(),
        "python": sys.executable,
        "workdir": str(workdir),
        "threads": 1,
    }
    return sshd.device(**{**defaults, **keys})


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def command_line(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_tls_cluster_over_ssh_serves_a_chat_request(cluster_files, sshd: SshServer, tmp_path: Path) -> None:
    workdir = tmp_path / "remote-home"
    devices = [
        coordinator_device(),
        {"name": "w1", "host": "127.0.0.1", "port": free_port(), "threads": 1},
        ssh_worker(sshd, workdir),
    ]
    path = cluster_files.write(devices, name="tlsc", tls=True)
    started = meshllm("cluster", "start", "-c", path)
    assert started.returncode == 0, str(started)

    cluster = load_cluster(path)
    tls_dir = cluster.cluster.state_dir / "tls"
    ca = (tls_dir / "ca.pem").read_bytes()
    for name in ("coordinator", "w1", "remote"):
        assert mode(tls_dir / f"{name}.key") == 0o600
        cert = (tls_dir / f"{name}.pem").read_bytes()
        assert certs.signed_by(cert, ca) and certs.names_of(cert) == {"127.0.0.1"}
    assert mode(tls_dir / "ca.key") == 0o600 and mode(tls_dir) == 0o700
    remote_tls = workdir / ".meshllm" / "tlsc" / "tls"  # handed over ssh next to the token
    assert (remote_tls / "cert.pem").read_bytes() == (tls_dir / "remote.pem").read_bytes()
    assert (remote_tls / "ca.pem").read_bytes() == ca and mode(remote_tls / "key.pem") == 0o600
    argv = command_line(pid_record(path, "remote")["pid"])
    assert argv[argv.index("--tls-cert") + 1] == ".meshllm/tlsc/tls/cert.pem"
    assert "--tls-ca" in command_line(pid_record(path, "coordinator")["pid"])

    chat = meshllm("cluster", "test", "-c", path, "--max-tokens", "4")
    assert chat.returncode == 0, str(chat)
    rows = status_rows(path)  # status asks every worker's Info over TLS
    assert rows["w1"][4] == "healthy" and rows["remote"][4] == "healthy", rows

    state = ClusterState(cluster)
    token, member = state.existing_token(), state.client_tls()
    w1 = cluster.get("w1")
    assert stage_health(w1.address, token, 10, "w1", member).ok
    plaintext = stage_health(w1.address, token, 10, "w1")
    assert not plaintext.ok and plaintext.error.startswith(
        f"device 'w1' ({w1.address}) closed the connection"
    )
    logs = meshllm("cluster", "logs", "remote", "-c", path, "-n", "40")
    assert "mutual TLS" in logs.stdout, logs

    restarted = meshllm("cluster", "start", "-c", path)  # the certificates are kept, the cluster found up
    assert restarted.returncode == 0 and "already running" in restarted.stdout, restarted
    assert (tls_dir / "ca.pem").read_bytes() == ca


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_file_s_own_certificates_are_used_and_checked(cluster_files, tmp_path: Path) -> None:
    ca = certs.make_ca("own")
    own = tmp_path / "own"
    certs.write_private(own / "ca.pem", ca.cert)
    for name, host in (("coordinator", "127.0.0.1"), ("w1", "127.0.0.1"), ("misnamed", "10.1.2.3")):
        issued = certs.make_device_cert(ca, name, [host])
        certs.write_private(own / f"{name}.pem", issued.cert)
        certs.write_private(own / f"{name}.key", issued.key)

    def device(name: str, cert: str, **keys) -> dict:
        return {
            "name": name,
            "tls_cert": str(own / f"{cert}.pem"),
            "tls_key": str(own / f"{cert}.key"),
            **keys,
        }

    misnamed = cluster_files.write(
        [device("coordinator", "coordinator", host="127.0.0.1"), device("w1", "misnamed", host="127.0.0.1")],
        name="misnamed",
        tls_ca=str(own / "ca.pem"),
    )
    error = start_fails(misnamed)
    assert "device 'w1': tls_cert" in error and "names 10.1.2.3, not host '127.0.0.1'" in error

    path = cluster_files.write(
        [
            device("coordinator", "coordinator", host="127.0.0.1", threads=1),
            device("w1", "w1", host="127.0.0.1", port=free_port(), threads=1),
        ],
        name="own",
        tls_ca=str(own / "ca.pem"),
    )
    started = meshllm("cluster", "start", "-c", path)
    assert started.returncode == 0, str(started)
    argv = command_line(pid_record(path, "w1")["pid"])
    assert argv[argv.index("--tls-cert") + 1] == str(own / "w1.pem")
    assert not (load_cluster(path).cluster.state_dir / "tls").exists()  # nothing made: the file's are used
    chat = meshllm("cluster", "test", "-c", path, "--max-tokens", "4")
    assert chat.returncode == 0, str(chat)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_insecure_starts_in_plaintext_and_warns(cluster_files) -> None:
    path = cluster_files.write([coordinator_device()], name="insecure", insecure=True)
    started = meshllm("cluster", "start", "-c", path)
    assert started.returncode == 0, str(started)
    assert (
        "warning: " in started.stdout
        and "insecure = true: the links between the stages are plaintext" in (started.stdout)
    )
    assert "--insecure" in command_line(pid_record(path, "coordinator")["pid"])


def cluster_file(tmp_path: Path, cluster: dict, devices: list[dict]) -> Path:
    return write_cluster_file(tmp_path / "c.toml", {"model": "demo", **cluster}, devices)


def test_tls_is_on_off_loopback_and_asked_for_on_loopback(tmp_path: Path) -> None:
    local = [{"name": "c", "host": "127.0.0.1"}, {"name": "w", "host": "localhost"}]
    lan = [{"name": "c", "host": "127.0.0.1"}, {"name": "w", "host": "192.168.1.12"}]
    assert not load_cluster(cluster_file(tmp_path, {}, local)).uses_tls
    assert load_cluster(cluster_file(tmp_path, {"tls": True}, local)).uses_tls
    assert load_cluster(cluster_file(tmp_path, {}, lan)).uses_tls
    assert not load_cluster(cluster_file(tmp_path, {"insecure": True}, lan)).uses_tls


@pytest.mark.parametrize(
    ("cluster", "device", "message"),
    [
        ({"insecure": True, "tls": True}, {}, "[cluster]: insecure = true turns TLS off"),
        ({"insecure": "yes"}, {}, "[cluster]: insecure must be true or false, got 'yes'"),
        ({}, {"tls_cert": "w.pem", "tls_key": "w.key"}, "device 'w': tls_cert needs [cluster] tls_ca"),
        (
            {"tls_ca": "ca.pem"},
            {},
            "device 'c': [cluster] tls_ca is given, so every device needs a certificate",
        ),
        ({}, {"tls_cert": "w.pem"}, "device 'w': give tls_cert and tls_key together"),
    ],
)
def test_the_tls_keys_of_the_cluster_file_are_checked(tmp_path: Path, cluster, device, message) -> None:
    devices = [{"name": "c", "host": "127.0.0.1"}, {"name": "w", "host": "127.0.0.1", **device}]
    with pytest.raises(ConfigError) as caught:
        load_cluster(cluster_file(tmp_path, cluster, devices))
    assert message in str(caught.value)


def test_serve_and_worker_refuse_plaintext_beyond_loopback(tmp_path: Path) -> None:
    serve = meshllm("serve", "--workers", "w1=192.0.2.7:50051", "--port", str(free_port()), timeout=60)
    assert serve.returncode == 1, serve
    assert "serve: --workers w1=192.0.2.7:50051 without TLS" in serve.error
    assert "--tls-ca, --tls-cert and --tls-key" in serve.error and "--insecure" in serve.error
    worker = meshllm("worker", "--host", "0.0.0.0", "--port", str(free_port()), timeout=60)
    assert worker.returncode == 1 and "worker: listening on 0.0.0.0:" in worker.error, worker
    half = meshllm("worker", "--tls-ca", str(tmp_path / "ca.pem"), "--port", str(free_port()), timeout=60)
    assert half.returncode == 1 and "--tls-ca given without --tls-cert, --tls-key" in half.error, half


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_plan_measures_every_link_over_tls(cluster_files) -> None:
    path = cluster_files.local(workers=2, name="tlsplan", tls=True)
    result = meshllm("cluster", "plan", "-c", path, env={"MESHLLM_PREDICT": "1"})
    assert result.returncode == 0, str(result)
    assert re.search(r"^link coordinator -> w1: [\d.]+ ms round trip, \d+ MB/s$", result.stdout, re.M), result
    assert re.search(r"^link w1 -> w2: [\d.]+ ms round trip", result.stdout, re.M), result  # w1 dials w2


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_turning_tls_on_makes_the_running_processes_stale_and_force_restarts_them(cluster_files) -> None:
    devices = [coordinator_device(), {"name": "w1", "host": "127.0.0.1", "port": free_port(), "threads": 1}]
    api_port = free_port()
    path = cluster_files.write(devices, name="upgrade", api_port=api_port)
    first = meshllm("cluster", "start", "-c", path)
    assert first.returncode == 0, str(first)
    cluster_files.write(devices, name="upgrade", api_port=api_port, tls=True)  # the same file, TLS on

    error = start_fails(path)
    assert "device 'w1': pid" in error and "without TLS, but the file now asks for the links with it" in error
    assert "device 'coordinator': pid" in error and "--force" in error
    forced = meshllm("cluster", "start", "-c", path, "--force")
    assert forced.returncode == 0, str(forced)
    assert "--tls-cert" in command_line(pid_record(path, "w1")["pid"])
    chat = meshllm("cluster", "test", "-c", path, "--max-tokens", "4")
    assert chat.returncode == 0, str(chat)
