"""Why a start fails, said in one line that names the device and the fix. Each test creates the condition
for real: a held port, a missing interpreter, a virtualenv without meshllm, another meshllm version, a
missing model folder, too little memory, a worker that crashes, a host nobody answers on."""

from __future__ import annotations

import os
import socket
import sys
import venv
from pathlib import Path

import pytest
from cluster_helpers import free_port, meshllm

from meshllm import __version__


def start_fails(path: Path, *extra: str) -> str:
    result = meshllm("cluster", "start", "-c", path, *extra)
    assert result.returncode == 1, result
    assert result.stderr.startswith("error: "), result
    return result.error


def coordinator() -> dict:
    return {"name": "coordinator", "host": "127.0.0.1", "threads": 1}


def worker(name: str = "w1", **keys) -> dict:
    return {"name": name, "host": "127.0.0.1", "port": free_port(), "threads": 1, **keys}


def test_a_port_in_use_names_the_pid_and_command_holding_it(cluster_files) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        path = cluster_files.write([coordinator(), worker(port=port)])
        error = start_fails(path)
    assert f"device 'w1': port {port} on 127.0.0.1 is in use by pid {os.getpid()} (" in error
    assert f"stop it, or set port = N for w1 in {path}" in error


def test_a_python_that_does_not_exist_asks_for_the_python_key(cluster_files) -> None:
    path = cluster_files.write([coordinator(), worker(python="/nowhere/bin/python")])
    error = start_fails(path)
    assert "device 'w1': `python` not found on this machine (tried '/nowhere/bin/python')" in error
    assert f'set python = "{sys.executable}" for w1 in {path}' in error


def test_a_python_without_meshllm_gets_the_install_command(cluster_files, tmp_path: Path) -> None:
    venv.create(tmp_path / "bare", with_pip=False)
    python = str(tmp_path / "bare" / "bin" / "python")
    path = cluster_files.write([coordinator(), worker(python=python)])
    error = start_fails(path)
    assert f"device 'w1': meshllm is not importable by {python} on this machine" in error
    assert "No module named 'meshllm'" in error
    assert f"install it there: {python} -m pip install meshllm=={__version__}" in error


def test_another_meshllm_version_than_the_coordinators_is_refused(cluster_files, tmp_path: Path) -> None:
    # A python whose meshllm reports 0.0.9: a sitecustomize on its path rewrites the version at start.
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "sitecustomize.py").write_text("import meshllm\nmeshllm.__version__ = '0.0.9'\n")
    wrapper = tmp_path / "old-python"
    wrapper.write_text(f'#!/bin/sh\nPYTHONPATH={tmp_path / "old"} exec {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    path = cluster_files.write([coordinator(), worker(python=str(wrapper))])
    error = start_fails(path)
    assert (
        f"device 'w1' runs meshllm 0.0.9, the coordinator (coordinator) {__version__}; "
        f"install the same version on both: {wrapper} -m pip install meshllm=={__version__}"
    ) in error


def test_a_model_folder_missing_on_a_worker_names_the_path_there(cluster_files, tmp_path: Path) -> None:
    here, there = tmp_path / "here", tmp_path / "there"
    here.mkdir(), there.mkdir()
    (here / "model").symlink_to(cluster_files.checkpoint)
    devices = [{**coordinator(), "workdir": str(here)}, worker(workdir=str(there))]
    path = cluster_files.write(devices, model="./model")
    error = start_fails(path)
    assert f"device 'w1': model folder {there / 'model'} does not exist there" in error
    assert "device 'coordinator'" not in error


def test_a_model_that_does_not_fit_says_how_much_memory_is_missing(cluster_files) -> None:
    devices = [{**coordinator(), "memory": 0.0001}, worker(memory=0.0001), worker("w2", memory=0.0001)]
    error = start_fails(cluster_files.write(devices))
    assert error.startswith("error: the model does not fit: coordinator needs ")
    assert "GB missing (add a device" in error


def test_a_worker_that_exits_during_start_shows_the_end_of_its_log(cluster_files, tmp_path: Path) -> None:
    # A broken torch install on the worker's path: importable as a package, failing when imported.
    (tmp_path / "broken" / "torch").mkdir(parents=True)
    (tmp_path / "broken" / "torch" / "__init__.py").write_text(
        "raise ImportError('libtorch_cpu.so: cannot open shared object file')\n"
    )
    path = cluster_files.write([coordinator(), worker(env={"PYTHONPATH": str(tmp_path / "broken")})])
    error = start_fails(path)
    assert "device 'w1': the worker exited during start. Last lines of " in error
    assert "w1.log:" in error
    assert "ImportError: libtorch_cpu.so: cannot open shared object file" in error


def test_a_coordinator_that_exits_during_start_shows_the_end_of_its_log(cluster_files) -> None:
    devices = [{**coordinator(), "env": {"HF_HUB_OFFLINE": "1"}}]
    error = start_fails(cluster_files.write(devices, model="nobody/no-such-model"))
    assert "device 'coordinator': the coordinator exited during start. Last lines of " in error
    assert "model 'nobody/no-such-model': could not download from the Hugging Face hub" in error


def test_a_worker_nobody_reaches_at_its_host_times_out_naming_host_and_port(cluster_files) -> None:
    # It listens on 127.0.0.1 while the file says others reach it at 127.0.0.2: the wrong interface.
    unreachable = worker(host="127.0.0.2", bind="127.0.0.1")
    path = cluster_files.write([coordinator(), unreachable])
    error = start_fails(path, "--timeout", "3")
    assert f"device 'w1': no answer to Health at 127.0.0.2:{unreachable['port']} within 3 s" in error
    assert "is host = '127.0.0.2' the address this machine reaches it at" in error


@pytest.mark.parametrize("action", ["status", "stop", "logs"])
def test_commands_on_a_cluster_never_started_say_so(cluster_files, action: str) -> None:
    path = cluster_files.write([coordinator(), worker()])
    result = meshllm("cluster", action, "-c", path)
    if action == "status":
        assert result.returncode == 1
        assert [line.split()[4] for line in result.stdout.splitlines()[1:3]] == ["stopped", "stopped"]
    elif action == "stop":
        assert result.returncode == 0 and "is not running" in result.stdout
    else:
        assert "(no log at " in result.stdout
