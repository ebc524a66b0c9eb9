"""`meshllm cluster start`: a whole local cluster (a coordinator and two workers, real processes) started,
started again, a worker killed by hand and brought back, a hung worker replaced with --force (these
share one cluster and run in file order); and starts that fail because a process exits or cannot be
reached, said in one line that names the device and the fix."""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

import httpx
import pytest
from cluster_helpers import (
    CliResult,
    coordinator_device,
    free_port,
    is_running,
    meshllm,
    pid_record,
    start_fails,
    status_rows,
    wait_until,
    worker_device,
)

from meshllm.config import load_cluster

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def started(module_cluster_files) -> tuple[Path, CliResult]:
    path = module_cluster_files.local(workers=2, name="lifecycle", step_ports=True)
    return path, meshllm("cluster", "start", "-c", path)


@pytest.fixture(scope="module")
def cluster_file(started: tuple[Path, CliResult]) -> Path:
    path, result = started
    assert result.returncode == 0, str(result)
    return path


def supervised_worker_pid(path: Path, device: str) -> int:
    """The pid of the worker that the device's supervisor runs now (from its status file)."""
    report = json.loads(Path(pid_record(path, device)["status_file"]).read_text())
    assert report["state"] == "running", report
    return report["worker_pid"]


def gpu_info(path: Path) -> dict[str, dict]:
    url = load_cluster(path).api_url
    devices = httpx.get(f"{url}/distributed/gpu-info", timeout=30).json()["devices"]
    return {device["name"]: device for device in devices}


def test_start_checks_every_device_then_prints_the_plan_and_the_api_url(started) -> None:
    path, result = started
    assert result.returncode == 0, str(result)
    url = load_cluster(path).api_url
    for name in ("coordinator", "w1", "w2"):
        assert f"checking {name} … python" in result.stdout
    assert "worker w1 answers Health" in result.stdout
    assert "coordinator coordinator healthy" in result.stdout
    assert "layers [0, " in result.stdout
    assert result.stdout.rstrip().endswith(f"API ready at {url}/v1")
    for device in load_cluster(path).workers:  # each on the step_port its [[device]] gives
        log = meshllm("cluster", "logs", "-c", path, device.name).stdout
        assert f"step links on port {device.step_port}" in log, log


def test_start_again_says_it_is_already_running(cluster_file: Path) -> None:
    pids = {name: pid_record(cluster_file, name)["pid"] for name in ("coordinator", "w1", "w2")}
    result = meshllm("cluster", "start", "-c", cluster_file)
    assert result.returncode == 0, str(result)
    assert "is already running" in result.stdout
    assert {name: pid_record(cluster_file, name)["pid"] for name in pids} == pids


def test_a_killed_worker_shows_down_and_start_brings_back_just_that_worker(cluster_file: Path) -> None:
    coordinator, w1, w2 = (pid_record(cluster_file, name)["pid"] for name in ("coordinator", "w1", "w2"))
    os.kill(w2, signal.SIGKILL)  # the pid file names w2's supervisor: its worker goes with it
    wait_until(lambda: not is_running(w2))

    assert status_rows(cluster_file)["w2"][4] == "down"
    wait_until(lambda: gpu_info(cluster_file)["w2"]["status"] != "healthy")

    result = meshllm("cluster", "start", "-c", cluster_file)
    assert result.returncode == 0, str(result)
    assert "checking w2" in result.stdout and "checking w1" not in result.stdout
    assert pid_record(cluster_file, "w2")["pid"] != w2
    assert (pid_record(cluster_file, "coordinator")["pid"], pid_record(cluster_file, "w1")["pid"]) == (
        coordinator,
        w1,
    )
    assert all(row[4] == "healthy" for row in status_rows(cluster_file).values())
    assert meshllm("cluster", "test", "-c", cluster_file, "--max-tokens", "4").returncode == 0


def test_a_hung_worker_is_reported_and_start_force_replaces_it(cluster_file: Path) -> None:
    supervisor = pid_record(cluster_file, "w1")["pid"]
    hung = supervised_worker_pid(cluster_file, "w1")
    os.kill(hung, signal.SIGSTOP)
    try:
        refused = meshllm("cluster", "start", "-c", cluster_file)
        assert refused.returncode == 1
        assert (
            f"device 'w1': pid {supervisor} from an earlier start still runs but does not answer Health"
            in refused.error
        )
        assert f"run `meshllm cluster stop -c {cluster_file}` or add --force" in refused.error

        forced = meshllm("cluster", "start", "-c", cluster_file, "--force")
        assert forced.returncode == 0, str(forced)
        assert f"stopping stale worker w1 (pid {supervisor})" in forced.stdout
        assert not is_running(hung)
        assert meshllm("cluster", "test", "-c", cluster_file, "--max-tokens", "4").returncode == 0
    finally:
        if is_running(hung):
            os.kill(hung, signal.SIGKILL)


def test_a_worker_that_exits_during_start_shows_the_end_of_its_log(cluster_files, tmp_path: Path) -> None:
    # A broken torch install on the worker's path: importable as a package, failing when imported.
    (tmp_path / "broken" / "torch").mkdir(parents=True)
    (tmp_path / "broken" / "torch" / "__init__.py").write_text(
        "raise ImportError('libtorch_cpu.so: cannot open shared object file')\n"
    )
    path = cluster_files.write(
        [coordinator_device(), worker_device(env={"PYTHONPATH": str(tmp_path / "broken")})]
    )
    error = start_fails(path)
    assert "device 'w1': the worker exited during start. Last lines of " in error
    assert "w1.log:" in error
    assert "ImportError: libtorch_cpu.so: cannot open shared object file" in error


def test_a_coordinator_that_exits_during_start_shows_the_end_of_its_log(cluster_files) -> None:
    devices = [coordinator_device(env={"HF_HUB_OFFLINE": "1"})]
    error = start_fails(cluster_files.write(devices, model="nobody/no-such-model"))
    assert "device 'coordinator': the coordinator exited during start. Last lines of " in error
    assert "model 'nobody/no-such-model': could not download from the Hugging Face hub" in error


def test_a_worker_nobody_reaches_at_its_host_times_out_naming_host_and_port(cluster_files) -> None:
    # It listens on 127.0.0.1 while the file says others reach it at 127.0.0.2: the wrong interface.
    unreachable = worker_device(host="127.0.0.2", bind="127.0.0.1")
    path = cluster_files.write([coordinator_device(), unreachable])
    error = start_fails(path, "--timeout", "3")
    assert f"device 'w1': no answer to Health at 127.0.0.2:{unreachable['port']} within 3 s" in error
    assert "is host = '127.0.0.2' the address this machine reaches it at" in error


def test_the_cluster_file_s_quantization_reaches_every_device(cluster_files) -> None:
    devices = [
        {"name": "coordinator", "host": "127.0.0.1", "threads": 1},
        {"name": "w1", "host": "127.0.0.1", "port": free_port(), "threads": 1, "quantize": "int4"},
    ]
    path = cluster_files.write(devices, name="quantized", quantize="int8", dtype="bfloat16")
    result = meshllm("cluster", "start", "-c", path)
    assert result.returncode == 0, str(result)
    port = next(line for line in path.read_text().splitlines() if line.startswith("api_port")).split("=")[1]
    info = httpx.get(f"http://127.0.0.1:{port.strip()}/distributed/gpu-info", timeout=30).json()
    assert [(d["name"], d["quantize"]) for d in info["devices"]] == [("coordinator", "int8"), ("w1", "int4")]
    smoke = meshllm("cluster", "test", "-c", path, "--max-tokens", "4")
    assert smoke.returncode == 0, str(smoke)


def test_a_worker_without_the_model_takes_its_weights_and_one_with_model_path_reads_its_own(
    cluster_files, tmp_path: Path
) -> None:
    here, empty = tmp_path / "here", tmp_path / "empty"
    here.mkdir(), empty.mkdir()
    (here / "model").symlink_to(cluster_files.checkpoint)
    no_model = {
        "HF_HOME": str(tmp_path / "w1-hf"),
        "HF_HUB_OFFLINE": "1",
        "MESHLLM_WEIGHTS_CACHE": str(tmp_path / "w1-weights"),
    }
    devices = [
        coordinator_device(workdir=str(here)),
        worker_device("w1", workdir=str(empty), env=no_model),
        worker_device(
            "w2",
            model_path=str(cluster_files.checkpoint),
            env={"MESHLLM_WEIGHTS_CACHE": str(tmp_path / "w2-weights")},
        ),
    ]
    path = cluster_files.write(devices, name="shared", model="./model")
    result = meshllm("cluster", "start", "-c", path)
    assert result.returncode == 0, str(result)
    assert re.search(
        r"  w1: layers \[\d+, \d+\) loaded in [\d.]+ s; weights of layers .*: [1-9]\d* bytes received",
        result.stdout,
    )
    assert re.search(r"  w2: layers \[\d+, \d+\) loaded in [\d.]+ s\n", result.stdout), result.stdout
    smoke = meshllm("cluster", "test", "-c", path, "--max-tokens", "4")
    assert smoke.returncode == 0, str(smoke)
    cached = list((tmp_path / "w1-weights").glob("*/layers-*/*.safetensors"))
    assert cached and not (tmp_path / "w2-weights").exists()
    log = meshllm("cluster", "logs", "-c", path, "coordinator", "-n", "400").stdout
    assert "w1: layers [" in log and "bytes received" in log
