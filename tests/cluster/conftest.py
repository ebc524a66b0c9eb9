"""Fixtures of the cluster tests: cluster files on free ports (whatever they start is stopped at the end),
a running local cluster, and a private sshd on 127.0.0.1."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cluster_helpers import SshServer, free_port, meshllm, start_sshd, write_cluster_file

from meshllm.runtime.local_workers import free_ports


class ClusterFiles:
    """Writes cluster files into one folder and remembers them, so that teardown can stop them all."""

    def __init__(self, folder: Path, checkpoint: Path) -> None:
        self.folder = folder
        self.checkpoint = checkpoint
        self.paths: list[Path] = []

    def write(self, devices: list[dict[str, Any]], name: str = "test", **cluster: Any) -> Path:
        """A cluster file for `devices`; [cluster] gets the tiny checkpoint and a free API port by default."""
        api_port, weights_port = free_ports(2)
        cluster = {"name": name, "model": str(self.checkpoint), "api_port": api_port, **cluster}
        cluster.setdefault("weights_port", weights_port)
        path = write_cluster_file(self.folder / f"{name}.toml", cluster, devices)
        self.paths.append(path)
        return path

    def local(self, workers: int = 2, name: str = "test", step_ports: bool = False, **cluster: Any) -> Path:
        """A coordinator and `workers` workers on 127.0.0.1, one compute thread each (and, with
        `step_ports`, each worker's step links on a port given in the file)."""
        devices = [{"name": "coordinator", "host": "127.0.0.1", "threads": 1}]
        devices += [
            {"name": f"w{index}", "host": "127.0.0.1", "port": free_port(), "threads": 1}
            for index in range(1, workers + 1)
        ]
        if step_ports:
            for device in devices[1:]:
                device["step_port"] = free_port()
        return self.write(devices, name=name, **cluster)

    def stop_all(self) -> None:
        for path in self.paths:
            meshllm("cluster", "stop", "-c", path, "--grace", "3")


@pytest.fixture
def cluster_files(tmp_path: Path, tiny_checkpoint: Callable[..., Path]) -> Iterator[ClusterFiles]:
    files = ClusterFiles(tmp_path, tiny_checkpoint(arch="qwen3", layers=4))
    try:
        yield files
    finally:
        files.stop_all()


@pytest.fixture(scope="module")
def module_cluster_files(
    tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Callable[..., Path]
) -> Iterator[ClusterFiles]:
    files = ClusterFiles(tmp_path_factory.mktemp("clusters"), tiny_checkpoint(arch="qwen3", layers=4))
    try:
        yield files
    finally:
        files.stop_all()


@pytest.fixture(scope="module")
def running_cluster(module_cluster_files: ClusterFiles) -> Path:
    """The file of a coordinator and two workers on 127.0.0.1 that `cluster start` started (once per
    test file; stopped after its last test)."""
    path = module_cluster_files.local(workers=2, name="running")
    result = meshllm("cluster", "start", "-c", path)
    assert result.returncode == 0, str(result)
    return path


@pytest.fixture(scope="session")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshServer]:
    """An sshd on 127.0.0.1 for the ssh path (skipped where no sshd exists, except under CI)."""
    server = start_sshd(tmp_path_factory.mktemp("sshd"))
    try:
        yield server
    finally:
        server.process.terminate()
        server.process.wait(timeout=10)
