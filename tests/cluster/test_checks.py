"""What the checks before a start find, said in one line that names the device and the fix. Each test
creates the condition for real: a held port, a virtualenv without meshllm, another meshllm version, a
missing model folder, too little memory."""

from __future__ import annotations

import os
import socket
import sys
import venv
from pathlib import Path

from cluster_helpers import coordinator_device, start_fails, worker_device

from meshllm import __version__


def test_a_port_in_use_names_the_pid_and_command_holding_it(cluster_files) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        path = cluster_files.write([coordinator_device(), worker_device(port=port)])
        error = start_fails(path)
    assert f"device 'w1': port {port} on 127.0.0.1 is in use by pid {os.getpid()} (" in error
    assert f"stop it, or set port = N for w1 in {path}" in error


def test_a_python_without_meshllm_gets_the_install_command(cluster_files, tmp_path: Path) -> None:
    venv.create(tmp_path / "bare", with_pip=False)
    python = str(tmp_path / "bare" / "bin" / "python")
    path = cluster_files.write([coordinator_device(), worker_device(python=python)])
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
    path = cluster_files.write([coordinator_device(), worker_device(python=str(wrapper))])
    error = start_fails(path)
    assert (
        f"device 'w1' runs meshllm 0.0.9, the coordinator (coordinator) {__version__}; "
        f"install the same version on both: {wrapper} -m pip install meshllm=={__version__}"
    ) in error


def test_a_worker_s_own_model_folder_missing_there_is_named_with_both_fixes(
    cluster_files, tmp_path: Path
) -> None:
    here, there = tmp_path / "here", tmp_path / "there"
    here.mkdir(), there.mkdir()
    (here / "model").symlink_to(cluster_files.checkpoint)
    devices = [coordinator_device(workdir=str(here)), worker_device(workdir=str(there), model_path="./model")]
    path = cluster_files.write(devices, model="./model")
    error = start_fails(path)
    assert (
        f"device 'w1': model folder {there / 'model'} does not exist there (model_path = './model', relative "
        f"to workdir {there}); copy the checkpoint there, or remove model_path for w1"
    ) in error
    assert "device 'coordinator'" not in error


def test_the_coordinator_s_model_folder_missing_is_named(cluster_files, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    path = cluster_files.write([coordinator_device(workdir=str(empty)), worker_device()], model="./model")
    error = start_fails(path)
    assert (
        f"device 'coordinator': model folder {empty / 'model'} does not exist there (model = './model'"
        in error
    )
    assert "device 'w1'" not in error  # it takes its weights from the coordinator


def test_a_model_that_does_not_fit_says_how_much_memory_is_missing(cluster_files) -> None:
    devices = [
        coordinator_device(memory=0.0001),
        worker_device(memory=0.0001),
        worker_device("w2", memory=0.0001),
    ]
    error = start_fails(cluster_files.write(devices))
    assert error.startswith("error: the model does not fit: coordinator needs ")
    assert "GB missing (add a device" in error
