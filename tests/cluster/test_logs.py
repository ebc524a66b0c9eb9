"""`meshllm cluster logs`: the last lines of each device's log, prefixed with its name, and `-f` following."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from cluster_helpers import coordinator_device, meshllm, worker_device

from meshllm.config import load_cluster

LINE = "2026-05-04 10:12:01,482 host [worker {name}] INFO meshllm.runtime.worker: line {index}\n"


def write_logs(cluster_file) -> dict:
    folder = load_cluster(cluster_file).cluster.state_dir / "logs"
    folder.mkdir(parents=True)
    paths = {}
    for name in ("w1", "w2"):
        paths[name] = folder / f"{name}.log"
        paths[name].write_text("".join(LINE.format(name=name, index=index) for index in range(30)))
    return paths


def test_logs_prefix_each_line_with_its_device_when_showing_several(cluster_files) -> None:
    path = cluster_files.local(workers=2)
    write_logs(path)
    result = meshllm("cluster", "logs", "-c", path, "-n", "2")
    assert result.returncode == 0, str(result)
    lines = result.stdout.splitlines()
    assert lines[0].startswith("coordinator | (no log at ")
    assert [line.split(" | ")[0].strip() for line in lines[1:]] == ["w1", "w1", "w2", "w2"]
    assert lines[-1].endswith("[worker w2] INFO meshllm.runtime.worker: line 29")


def test_logs_of_one_device_are_shown_as_they_are(cluster_files) -> None:
    path = cluster_files.local(workers=2)
    write_logs(path)
    result = meshllm("cluster", "logs", "w1", "-c", path, "-n", "3")
    assert result.stdout == "".join(LINE.format(name="w1", index=index) for index in (27, 28, 29))


def test_logs_follow_prints_lines_as_they_are_appended(cluster_files) -> None:
    path = cluster_files.local(workers=2)
    logs = write_logs(path)
    follower = subprocess.Popen(
        [sys.executable, "-m", "meshllm", "cluster", "logs", "w2", "-f", "-n", "1", "-c", str(path)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert follower.stdout is not None
        assert follower.stdout.readline().endswith("line 29\n")
        time.sleep(0.5)
        with logs["w2"].open("a") as log:
            log.write(LINE.format(name="w2", index="appended"))
        assert follower.stdout.readline().endswith("line appended\n")
    finally:
        follower.terminate()
        follower.wait(timeout=10)


def test_logs_of_a_cluster_never_started_say_there_is_no_log(cluster_files) -> None:
    path = cluster_files.write([coordinator_device(), worker_device()])
    result = meshllm("cluster", "logs", "-c", path)
    assert "(no log at " in result.stdout


@pytest.mark.slow
def test_logs_show_every_device_with_time_host_and_role(running_cluster: Path) -> None:
    result = meshllm("cluster", "logs", "-c", running_cluster, "-n", "5")
    assert result.returncode == 0, str(result)
    assert any(
        line.startswith("w1          | ") and "[worker w1] INFO" in line
        for line in result.stdout.splitlines()
    )
    assert any(
        line.startswith("coordinator | ") and "[coordinator]" in line for line in result.stdout.splitlines()
    )
    only = meshllm("cluster", "logs", "w2", "-c", running_cluster, "-n", "2")
    assert len(only.stdout.splitlines()) == 2 and "[worker w2]" in only.stdout
