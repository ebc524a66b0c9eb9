"""A whole local cluster (a coordinator and two workers, real processes) through start, status, test, logs,
a worker killed by hand, a hung worker, and stop. The tests share one cluster and run in file order."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import pytest
from cluster_helpers import CliResult, is_running, meshllm, pid_record, port_is_free

from meshllm.config import load_cluster

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def started(module_cluster_files) -> tuple[Path, CliResult]:
    path = module_cluster_files.local(workers=2, name="lifecycle")
    return path, meshllm("cluster", "start", "-c", path)


@pytest.fixture(scope="module")
def cluster_file(started: tuple[Path, CliResult]) -> Path:
    path, result = started
    assert result.returncode == 0, result
    return path


def status_rows(path: Path) -> dict[str, list[str]]:
    result = meshllm("cluster", "status", "-c", path)
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["device", "host", "role", "pid", "state", "layers", "memory", "rtt"], result
    return {line.split()[0]: line.split() for line in lines[1:] if not line.startswith("API")}


def gpu_info(path: Path) -> dict[str, dict]:
    url = load_cluster(path).api_url
    devices = httpx.get(f"{url}/distributed/gpu-info", timeout=30).json()["devices"]
    return {device["name"]: device for device in devices}


def wait_until(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.3)


def test_start_checks_every_device_then_prints_the_plan_and_the_api_url(started) -> None:
    path, result = started
    assert result.returncode == 0, result
    url = load_cluster(path).api_url
    for name in ("coordinator", "w1", "w2"):
        assert f"checking {name} … python" in result.stdout
    assert "worker w1 answers Health" in result.stdout
    assert "coordinator coordinator healthy" in result.stdout
    assert "layers [0, " in result.stdout
    assert result.stdout.rstrip().endswith(f"API ready at {url}/v1")


def test_status_lists_every_device_healthy_with_its_layers(cluster_file: Path) -> None:
    rows = status_rows(cluster_file)
    assert set(rows) == {"coordinator", "w1", "w2"}
    for name, row in rows.items():
        assert row[4] == "healthy", row
        assert row[3] == str(pid_record(cluster_file, name)["pid"])
    ranges = sorted((int(row[5].strip("[,")), int(row[6].strip(")"))) for row in rows.values())
    assert ranges[0][0] == 0 and ranges[-1][1] == 4
    assert all(ranges[index][1] == ranges[index + 1][0] for index in range(2))


def test_test_sends_one_chat_completion_and_reports_tokens_per_second(cluster_file: Path) -> None:
    result = meshllm("cluster", "test", "-c", cluster_file, "--max-tokens", "8")
    assert result.returncode == 0, result
    assert result.stdout.rstrip().endswith("tok/s")
    assert " · 8 tokens · " in result.stdout


def test_start_again_says_it_is_already_running(cluster_file: Path) -> None:
    pids = {name: pid_record(cluster_file, name)["pid"] for name in ("coordinator", "w1", "w2")}
    result = meshllm("cluster", "start", "-c", cluster_file)
    assert result.returncode == 0, result
    assert "is already running" in result.stdout
    assert {name: pid_record(cluster_file, name)["pid"] for name in pids} == pids


def test_logs_show_every_device_with_time_host_and_role(cluster_file: Path) -> None:
    result = meshllm("cluster", "logs", "-c", cluster_file, "-n", "5")
    assert result.returncode == 0, result
    assert any(
        line.startswith("w1          | ") and "[worker w1] INFO" in line
        for line in result.stdout.splitlines()
    )
    assert any(
        line.startswith("coordinator | ") and "[coordinator]" in line for line in result.stdout.splitlines()
    )
    only = meshllm("cluster", "logs", "w2", "-c", cluster_file, "-n", "2")
    assert len(only.stdout.splitlines()) == 2 and "[worker w2]" in only.stdout


def test_a_killed_worker_shows_down_and_start_brings_back_just_that_worker(cluster_file: Path) -> None:
    coordinator, w1, w2 = (pid_record(cluster_file, name)["pid"] for name in ("coordinator", "w1", "w2"))
    os.kill(w2, signal.SIGKILL)
    wait_until(lambda: not is_running(w2))

    assert status_rows(cluster_file)["w2"][4] == "down"
    wait_until(lambda: gpu_info(cluster_file)["w2"]["status"] != "healthy")

    result = meshllm("cluster", "start", "-c", cluster_file)
    assert result.returncode == 0, result
    assert "checking w2" in result.stdout and "checking w1" not in result.stdout
    assert pid_record(cluster_file, "w2")["pid"] != w2
    assert (pid_record(cluster_file, "coordinator")["pid"], pid_record(cluster_file, "w1")["pid"]) == (
        coordinator,
        w1,
    )
    assert all(row[4] == "healthy" for row in status_rows(cluster_file).values())
    assert meshllm("cluster", "test", "-c", cluster_file, "--max-tokens", "4").returncode == 0


def test_a_hung_worker_is_reported_and_start_force_replaces_it(cluster_file: Path) -> None:
    hung = pid_record(cluster_file, "w1")["pid"]
    os.kill(hung, signal.SIGSTOP)
    try:
        refused = meshllm("cluster", "start", "-c", cluster_file)
        assert refused.returncode == 1
        assert (
            f"device 'w1': pid {hung} from an earlier start still runs but does not answer Health"
            in refused.error
        )
        assert f"run `meshllm cluster stop -c {cluster_file}` or add --force" in refused.error

        forced = meshllm("cluster", "start", "-c", cluster_file, "--force")
        assert forced.returncode == 0, forced
        assert f"stopping stale worker w1 (pid {hung})" in forced.stdout
        assert not is_running(hung)
        assert meshllm("cluster", "test", "-c", cluster_file, "--max-tokens", "4").returncode == 0
    finally:
        if is_running(hung):
            os.kill(hung, signal.SIGKILL)


def test_stop_ends_every_process_frees_every_port_and_can_run_twice(cluster_file: Path) -> None:
    cluster = load_cluster(cluster_file)
    pids = [pid_record(cluster_file, device.name)["pid"] for device in cluster.device]
    result = meshllm("cluster", "stop", "-c", cluster_file)
    assert result.returncode == 0, result
    assert result.stdout.splitlines()[0].startswith("coordinator coordinator")  # the coordinator first
    assert not any(is_running(pid) for pid in pids)
    assert port_is_free(cluster.cluster.api_port)
    assert all(port_is_free(worker.port) for worker in cluster.workers)
    assert not list(cluster.cluster.state_dir.glob("pids/*.json"))

    again = meshllm("cluster", "stop", "-c", cluster_file)
    assert again.returncode == 0 and "is not running" in again.stdout
