"""`meshllm cluster install`: a device whose python has no meshllm gets a venv with this very version
(over ssh, the tests' own sshd on 127.0.0.1), which the next `cluster start` uses; a second install
changes nothing; a device with no usable python, a python that cannot make a venv and a pip that
reaches no index are each said in one line naming the device and the fix.

The venv is a plain one (no --system-site-packages): its wheels come from the machine's own pip
configuration (here a local folder holding torch 2.13.0 CPU, and pip's cache), which takes a minute
or two on a loaded machine, so this file is slow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from cluster_helpers import (
    SshServer,
    coordinator_device,
    free_port,
    is_running,
    meshllm,
    pid_record,
    start_fails,
)

from meshllm import __version__
from meshllm.config import load_cluster

pytestmark = pytest.mark.slow

# The interpreter this test's virtualenv was made from: a Python with no meshllm installed.
BARE_PYTHON = getattr(sys, "_base_executable", sys.executable)


@pytest.fixture(scope="module")
def bare_python() -> str:
    imports = subprocess.run([BARE_PYTHON, "-c", "import meshllm"], capture_output=True)
    if imports.returncode == 0:
        pytest.skip(f"{BARE_PYTHON} imports meshllm already; the install tests need a Python without it")
    return BARE_PYTHON


def remote_worker(sshd: SshServer, workdir: Path, **keys) -> dict:
    defaults = {"name": "remote", "host": "127.0.0.1", "port": free_port(), "workdir": str(workdir)}
    return sshd.device(**{**defaults, "threads": 1, "torch_index": "", **keys})


def install(path: Path) -> subprocess.CompletedProcess:
    return meshllm("cluster", "install", "-c", path, timeout=1500)


@pytest.mark.timeout(1500)  # a venv with torch: 2 to 4 minutes on a loaded 2-core machine
def test_a_device_without_meshllm_gets_a_venv_of_this_version_and_joins(
    cluster_files, sshd: SshServer, tmp_path: Path, bare_python: str
) -> None:
    workdir = tmp_path / "remote-home"
    path = cluster_files.write(
        [coordinator_device(), remote_worker(sshd, workdir, python=bare_python)], name="inst"
    )
    venv = workdir / ".meshllm" / "venv"

    first = install(path)
    assert first.returncode == 0, str(first)
    assert f"coordinator: meshllm {__version__} is there" in first.stdout
    assert f"remote: meshllm {__version__} installed in {venv} (python " in first.stdout
    # A CPU device without an engine named gets the ggml engine too, built there (its default on a CPU).
    assert "torch for cpu, the ggml engine) in " in first.stdout, first.stdout
    version = subprocess.run([venv / "bin/python", "-c", "import meshllm, ggml; print(meshllm.__version__)"],
                             capture_output=True, text=True)  # fmt: skip
    assert version.stdout.strip() == __version__, version.stderr

    touched = (
        (venv / "bin" / "python").stat().st_mtime,
        sorted(p.name for p in (venv / "lib").rglob("*.dist-info")),
    )
    second = install(path)
    assert second.returncode == 0, str(second)
    assert f"remote: meshllm {__version__} is there ({venv}/bin/python)" in second.stdout
    assert "installed" not in second.stdout
    assert touched == (
        (venv / "bin" / "python").stat().st_mtime,
        sorted(p.name for p in (venv / "lib").rglob("*.dist-info")),
    )

    # A second device on that machine whose python has another meshllm: it gets this version's venv
    # (the one there already), and its own python stays as it was.
    older = tmp_path / "older" / "meshllm"
    older.mkdir(parents=True)
    (older / "__init__.py").write_text('__version__ = "0.0.1"\n')
    wrapper = tmp_path / "python-with-0.0.1"
    wrapper.write_text(f'#!/bin/sh\nPYTHONPATH={older.parent} exec {bare_python} "$@"\n')
    wrapper.chmod(0o755)
    other = remote_worker(sshd, workdir, name="other", python=str(wrapper), venv=str(venv))
    other_path = cluster_files.write([coordinator_device(), other], name="inst-other")
    third = install(other_path)
    assert third.returncode == 0, str(third)
    assert f"other: meshllm {__version__} is there ({venv}/bin/python)" in third.stdout
    assert (older / "__init__.py").read_text() == '__version__ = "0.0.1"\n'
    recorded = json.loads(next(other_path.parent.glob(".meshllm/inst-other/installs/other.json")).read_text())
    assert recorded["python"] == str(venv / "bin" / "python") and recorded["base"] == str(wrapper)

    started = meshllm("cluster", "start", "-c", path)
    assert started.returncode == 0, str(started)
    record = pid_record(path, "remote")
    assert record["machine"]["python"] == str(venv / "bin" / "python")
    chat = meshllm("cluster", "test", "-c", path, "--max-tokens", "4")
    assert chat.returncode == 0, str(chat)
    url = load_cluster(path).api_url
    devices = {
        row["name"]: row for row in httpx.get(f"{url}/distributed/gpu-info", timeout=30).json()["devices"]
    }
    assert devices["remote"]["engine"] == "ggml", devices["remote"]
    assert meshllm("cluster", "stop", "-c", path).returncode == 0
    assert not is_running(record["pid"])


@pytest.mark.timeout(1500)
def test_a_ggml_engine_that_does_not_build_leaves_a_cpu_device_on_torch_unless_named(
    cluster_files, tmp_path: Path, bare_python: str
) -> None:
    # A machine without a C++ compiler: CMake finds none where CXX names one that is not there (install
    # builds ggml anew, never from the wheel pip kept from an earlier test's build).
    no_compiler = {"CC": "/nowhere/cc", "CXX": "/nowhere/c++"}
    worker = {"name": "w1", "host": "127.0.0.1", "port": free_port(), "python": bare_python,
              "workdir": str(tmp_path), "torch_index": "", "env": no_compiler}  # fmt: skip
    result = install(cluster_files.write([coordinator_device(), worker], name="noggml"))
    assert result.returncode == 0, str(result)
    venv = tmp_path / ".meshllm" / "venv"
    assert f"w1: meshllm {__version__} installed in {venv} (python " in result.stdout
    assert "; the ggml engine did not build there (no C/C++ compiler there; install one (" in result.stdout
    assert (
        'so it computes with torch, slower on a CPU: with that fixed, set engine = "ggml" for w1'
        in result.stdout
    )
    assert subprocess.run([venv / "bin/python", "-c", "import ggml"], capture_output=True).returncode != 0

    # Named, the engine must be there: install builds it into that venv, or says why it cannot.
    named = cluster_files.write([coordinator_device(), {**worker, "engine": "ggml"}], name="noggml")
    failed = install(named)
    assert failed.returncode == 1, str(failed)
    assert len(failed.stderr.strip().splitlines()) == 1, failed
    assert (
        f"error: device 'w1': the ggml engine (engine = \"ggml\" in {named}) did not build on this machine: "
        in (failed.stderr)
    )
    assert "no C/C++ compiler there; install one (`sudo apt install build-essential`" in failed.stderr
    # `cluster start` checks it before it starts anything, and says the same.
    refused = start_fails(named)
    assert (
        f"device 'w1' computes with the ggml engine (engine = \"ggml\" in {named}) but ggml, gguf cannot be "
        in (refused)
    )
    assert (
        f"imported on this machine; `meshllm cluster install -c {named}` builds it into meshllm's venv"
        in refused
    )


def test_start_install_leaves_devices_that_run_this_version_alone_and_starts(cluster_files) -> None:
    path = cluster_files.local(workers=1, name="startinstall")
    result = meshllm("cluster", "start", "--install", "-c", path)
    assert result.returncode == 0, str(result)
    assert f"coordinator: meshllm {__version__} is there ({sys.executable})" in result.stdout
    assert f"w1: meshllm {__version__} is there ({sys.executable})" in result.stdout
    assert not (path.parent / ".meshllm" / "startinstall" / "installs").exists()
    assert result.stdout.rstrip().endswith("/v1")


def test_a_device_with_no_usable_python_gets_a_one_line_diagnosis(
    cluster_files, sshd: SshServer, tmp_path: Path
) -> None:
    path = cluster_files.write(
        [coordinator_device(), remote_worker(sshd, tmp_path, python="/nowhere/python3")]
    )
    result = install(path)
    assert result.returncode == 1, result
    assert len(result.stderr.strip().splitlines()) == 1, result
    assert (
        f"error: device 'remote': no usable python on {sshd.target} over ssh (tried '/nowhere/python3'); "
        "install Python 3.10+ there"
    ) in result.stderr
    assert f'or set python = "/path/to/python3" for remote in {path}' in result.stderr


def test_a_python_that_cannot_make_a_venv_says_which_package_to_install(
    cluster_files, tmp_path: Path, bare_python: str
) -> None:
    # Debian's python3 without python3-venv: no ensurepip module.
    shadow = tmp_path / "shadow" / "ensurepip"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError(\"No module named 'ensurepip'\")\n")
    python = tmp_path / "python3"
    python.write_text(f'#!/bin/sh\nPYTHONPATH={shadow.parent} exec {bare_python} "$@"\n')
    python.chmod(0o755)
    worker = {
        "name": "w1",
        "host": "127.0.0.1",
        "port": free_port(),
        "python": str(python),
        "workdir": str(tmp_path),
    }
    result = install(cluster_files.write([coordinator_device(), worker]))
    assert result.returncode == 1, result
    assert len(result.stderr.strip().splitlines()) == 1, result
    assert f"device 'w1': python 3.{sys.version_info.minor}" in result.stderr
    assert (
        "cannot make a virtual environment (no ensurepip module); install it there (`sudo apt install python3."
        in result.stderr
    )
    assert not (tmp_path / ".meshllm" / "venv").exists()


def test_a_pip_that_reaches_no_index_says_so(cluster_files, tmp_path: Path, bare_python: str) -> None:
    closed = f"http://127.0.0.1:{free_port()}/simple"
    offline = {
        "PIP_CONFIG_FILE": "/dev/null",
        "PIP_INDEX_URL": closed,
        "PIP_RETRIES": "1",
        "PIP_TIMEOUT": "3",
    }
    worker = {"name": "w1", "host": "127.0.0.1", "port": free_port(), "python": bare_python,
              "workdir": str(tmp_path), "torch_index": "", "env": offline}  # fmt: skip
    result = install(cluster_files.write([coordinator_device(), worker]))
    assert result.returncode == 1, result
    assert len(result.stderr.strip().splitlines()) == 1, result
    assert "error: device 'w1': pip cannot reach a package index on this machine (" in result.stderr
    assert "or a mirror (`pip config set global.index-url URL`)" in result.stderr


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 16 MB tmpfs (mounting needs root: skipped without it)."""
    folder = tmp_path / "small-disk"
    folder.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(folder)]).returncode
    ):
        pytest.skip("mounting a small tmpfs needs root")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_a_disk_without_room_for_the_venv_says_so_before_anything_is_made(
    cluster_files, tmp_path: Path, bare_python: str, small_disk: Path
) -> None:
    venv = small_disk / "venv"
    worker = {"name": "w1", "host": "127.0.0.1", "port": free_port(), "python": bare_python,
              "workdir": str(tmp_path), "venv": str(venv)}  # fmt: skip
    path = cluster_files.write([coordinator_device(), worker])
    result = install(path)
    assert result.returncode == 1, result
    assert len(result.stderr.strip().splitlines()) == 1, result
    assert (
        f"error: device 'w1': only 16.8 MB free at {small_disk} on this machine, a venv with torch needs about 2.0 GB"
        in result.stderr
    )
    assert f'free some space there or set venv = "/a/bigger/disk/venv" for w1 in {path}' in result.stderr
    assert not venv.exists()
