"""`meshllm cluster status`: one row per device from its pid file, the coordinator's /distributed/gpu-info
(parsed into the API's device model) and, when the coordinator does not answer, each worker's own Info."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster_helpers import (
    FakeApi,
    coordinator_device,
    free_port,
    meshllm,
    pid_record,
    status_rows,
    worker_device,
)

from meshllm import __version__
from meshllm.cluster.state import ClusterState
from meshllm.cluster.status import show_status
from meshllm.config import Cluster, load_cluster
from meshllm.devices import DeviceStatus
from meshllm.step import LayerRange

# A stand-in for a device's process: `status` counts a pid as running when its command mentions meshllm.
SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)", "meshllm-test"]


@pytest.fixture
def sleepers() -> Iterator[list[subprocess.Popen]]:
    started: list[subprocess.Popen] = []
    yield started
    for process in started:
        process.kill()
        process.wait(timeout=10)


def record_running(cluster: Cluster, device_name: str, pid: int) -> None:
    """A pid file for `device_name`, as `start` writes it."""
    state = ClusterState(cluster)
    state.write(state.new_record(cluster.get(device_name), pid, "/dev/null", __version__))


def device_status(device_id: int, name: str, **keys) -> dict:
    """One row of gpu-info, as the coordinator's API writes it."""
    fields = {
        "device_id": device_id,
        "name": name,
        "hostname": "host",
        "address": "local" if name == "coordinator" else f"127.0.0.1:{50051 + device_id}",
        "role": "coordinator" if name == "coordinator" else "worker",
        "status": "healthy",
        "engine": "torch",
        "device_type": "cpu",
        "memory_total": 17_179_869_184,
        "memory_available": 8_000_000_000,
        "weight_bytes": 1_200_000,
        "layers": LayerRange(0, 1),
        "live_sequences": 0,
        "rtt_ms": None,
        "version": __version__,
        **keys,
    }
    return DeviceStatus(**fields).model_dump(mode="json")


def test_status_lists_every_device_healthy_with_its_layers(running_cluster: Path) -> None:
    rows = status_rows(running_cluster)
    assert set(rows) == {"coordinator", "w1", "w2"}
    for name, row in rows.items():
        assert row[4] == "healthy", row
        assert row[3] == str(pid_record(running_cluster, name)["pid"])
    ranges = sorted((int(row[5].strip("[,")), int(row[6].strip(")"))) for row in rows.values())
    assert ranges[0][0] == 0 and ranges[-1][1] == 4
    assert all(ranges[index][1] == ranges[index + 1][0] for index in range(2))


def test_status_of_a_cluster_never_started_shows_every_device_stopped(cluster_files) -> None:
    path = cluster_files.write([coordinator_device(), worker_device()])
    result = meshllm("cluster", "status", "-c", path)
    assert result.returncode == 1
    assert [line.split()[4] for line in result.stdout.splitlines()[1:3]] == ["stopped", "stopped"]


def test_the_table_shows_the_coordinators_view_of_each_running_device(cluster_files, sleepers) -> None:
    port = free_port()
    path = cluster_files.write(
        [coordinator_device(), worker_device("w1"), worker_device("w2")], api_port=port
    )
    cluster = load_cluster(path)
    for device in cluster.device:
        sleepers.append(subprocess.Popen(SLEEPER))
        record_running(cluster, device.name, sleepers[-1].pid)
    body = {
        "devices": [
            device_status(0, "coordinator", layers=[0, 2]),
            device_status(1, "w1", layers=[2, 3], weight_bytes=600_000, rtt_ms=0.42),
            device_status(2, "w2", layers=[3, 4], status="not loaded", weight_bytes=0, rtt_ms=1.26),
        ],
        "cluster_status": "degraded",
        "world_size": 3,
        "model": "tiny",
        "live_sequences": 0,
    }
    api = FakeApi(port, {"/distributed/gpu-info": body})
    try:
        lines: list[str] = []
        assert show_status(cluster, echo=lines.append) == 1  # w2 is not healthy
    finally:
        api.close()
    pids = [str(process.pid) for process in sleepers]
    assert [line.split() for line in lines] == [
        ["device", "host", "role", "pid", "state", "layers", "memory", "rtt"],
        [
            "coordinator",
            "127.0.0.1",
            "coordinator",
            pids[0],
            "healthy",
            "[0,",
            "2)",
            "1.2",
            "MB/17.2",
            "GB",
            "-",
        ],
        ["w1", "127.0.0.1", "worker", pids[1], "healthy", "[2,", "3)", "0.6", "MB/17.2", "GB", "0.4", "ms"],
        ["w2", "127.0.0.1", "worker", pids[2], "not", "loaded", "[3,", "4)", "-/17.2", "GB", "1.3", "ms"],
        ["API", f"{cluster.api_url}/v1:", "degraded", "·", "model", "tiny"],
    ]
    for column in ("pid", "state", "layers", "memory", "rtt"):  # the columns line up under the header
        start = lines[0].index(column)
        assert all(line[start - 2 : start] == "  " and line[start] != " " for line in lines[1:4]), column


def test_a_device_left_out_of_the_plan_shows_left_out_without_layers(cluster_files, sleepers) -> None:
    port = free_port()
    path = cluster_files.write([coordinator_device(), worker_device("w1")], api_port=port)
    cluster = load_cluster(path)
    for device in cluster.device:
        sleepers.append(subprocess.Popen(SLEEPER))
        record_running(cluster, device.name, sleepers[-1].pid)
    body = {
        "devices": [
            device_status(0, "coordinator", layers=[0, 4]),
            device_status(1, "w1", layers=[0, 0], status="unreachable", in_plan=False, rtt_ms=None),
        ],
        "cluster_status": "degraded",
        "world_size": 2,
        "model": "tiny",
        "live_sequences": 0,
    }
    api = FakeApi(port, {"/distributed/gpu-info": body})
    try:
        lines: list[str] = []
        assert show_status(cluster, echo=lines.append) == 1  # degraded is not healthy
    finally:
        api.close()
    w1 = lines[2].split()
    assert w1[:6] == ["w1", "127.0.0.1", "worker", str(sleepers[1].pid), "left", "out"] and w1[6] == "-"
    assert lines[-1].split()[2] == "degraded"


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        (
            {"devices": [{"name": "w1", "status": "fine"}], "model": "tiny"},
            "(devices.0.device_id: Field required",
        ),
        ([1, 2], "(not a JSON object: [1, 2])"),
    ],
)
def test_a_gpu_info_that_does_not_parse_is_said_in_one_line(cluster_files, body, detail: str) -> None:
    port = free_port()
    path = cluster_files.write([coordinator_device(), worker_device()], api_port=port)
    api = FakeApi(port, {"/distributed/gpu-info": body})
    try:
        result = meshllm("cluster", "status", "-c", path)
    finally:
        api.close()
    assert result.returncode == 1, result
    assert result.stderr == "", result  # no traceback
    lines = result.stdout.splitlines()
    assert len(lines) == 4, result  # the header, two devices, the API's line
    assert [line.split()[4] for line in lines[1:3]] == ["stopped", "stopped"]
    url = load_cluster(path).api_url
    assert lines[3].startswith(
        f"API {url}/v1: the coordinator answered /distributed/gpu-info with something unexpected {detail}"
    )


def test_without_the_coordinator_a_worker_is_described_by_its_own_info(cluster_files, start_workers) -> None:
    [stage] = start_workers(1, token="secret")
    path = cluster_files.write([coordinator_device(), worker_device(port=stage.port)], token="secret")
    cluster = load_cluster(path)
    record_running(cluster, "w1", stage.process.pid)
    lines: list[str] = []
    assert show_status(cluster, echo=lines.append) == 1
    row = lines[2].split()
    assert row[:6] == ["w1", "127.0.0.1", "worker", str(stage.process.pid), "not", "loaded"]
    assert row[6] == "-" and row[7].startswith("-/") and row[-1] == "-"  # no layers yet, no rtt
    assert lines[1].split()[4] == "stopped"
    assert lines[-1] == f"API {cluster.api_url}/v1: not answering"


def test_a_worker_that_refuses_the_token_is_not_answering(cluster_files, start_workers) -> None:
    [stage] = start_workers(1, token="secret")
    path = cluster_files.write([coordinator_device(), worker_device(port=stage.port)], token="another")
    cluster = load_cluster(path)
    record_running(cluster, "w1", stage.process.pid)
    lines: list[str] = []
    assert show_status(cluster, echo=lines.append) == 1
    assert lines[2].split()[4:6] == ["not", "answering"]
