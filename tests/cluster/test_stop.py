"""`meshllm cluster stop`: the coordinator first, then the workers; every process ends, every port is
free, and stopping twice (or a cluster never started) is harmless."""

from __future__ import annotations

from pathlib import Path

import pytest
from cluster_helpers import coordinator_device, is_running, meshllm, pid_record, port_is_free, worker_device

from meshllm.config import load_cluster


@pytest.mark.slow
def test_stop_ends_every_process_frees_every_port_and_can_run_twice(running_cluster: Path) -> None:
    cluster = load_cluster(running_cluster)
    pids = [pid_record(running_cluster, device.name)["pid"] for device in cluster.device]
    result = meshllm("cluster", "stop", "-c", running_cluster)
    assert result.returncode == 0, str(result)
    assert result.stdout.splitlines()[0].startswith("coordinator coordinator")  # the coordinator first
    assert not any(is_running(pid) for pid in pids)
    assert port_is_free(cluster.cluster.api_port)
    assert all(port_is_free(worker.port) for worker in cluster.workers)
    assert not list(cluster.cluster.state_dir.glob("pids/*.json"))

    again = meshllm("cluster", "stop", "-c", running_cluster)
    assert again.returncode == 0 and "is not running" in again.stdout


def test_stop_of_a_cluster_never_started_says_it_is_not_running(cluster_files) -> None:
    path = cluster_files.write([coordinator_device(), worker_device()])
    result = meshllm("cluster", "stop", "-c", path)
    assert result.returncode == 0 and "is not running" in result.stdout
