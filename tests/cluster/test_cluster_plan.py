"""`meshllm cluster plan`: the workers started, every device and link measured, the split and its
predicted speed printed; nothing loaded, and a later `start` uses the workers it started."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from cluster_helpers import coordinator_device, meshllm, status_rows, worker_device

pytestmark = pytest.mark.slow


def test_plan_measures_devices_and_links_and_start_then_uses_its_workers(cluster_files) -> None:
    path = cluster_files.local(workers=2, name="planned")
    result = meshllm("cluster", "plan", "-c", path, env={"MESHLLM_PREDICT": "1"})
    assert result.returncode == 0, str(result)
    out = result.stdout
    assert "workers w1, w2 started" in out
    assert re.search(
        r"^plan: coordinator layers \[0, \d\) · w1 layers \[\d, \d\) · w2 layers \[\d, 4\)$", out, re.M
    )
    # measured there, or over gRPC; a layer of the model's shape timed on each
    speeds = (
        r"reads [\d.]+ GB/s, computes \d+ GFLOP/s \(\d+ decoding\), "
        r"a layer adds [\d.]+ ms a decode token \([\d.]+ a prompt token, [\d.]+ a one-token step\)"
    )
    assert re.search(rf"^device speeds: coordinator {speeds}, w1 {speeds}, w2 {speeds}$", out, re.M), out
    assert re.search(r"^link coordinator -> w1: [\d.]+ ms round trip, \d+ MB/s$", out, re.M), out
    assert re.search(r"^link w1 -> w2: [\d.]+ ms round trip", out, re.M), out
    assert re.search(
        r"^predicted decode: [\d.]+ tok/s for one stream, [\d.]+ tok/s total for 16 streams", out, re.M
    )
    # The workers wait, unloaded, for the start that follows.
    started = meshllm("cluster", "start", "-c", path)
    assert started.returncode == 0, str(started)
    assert "checking w1" not in started.stdout  # they already run: only the coordinator starts
    rows = status_rows(path)
    assert all(rows[name][4] == "healthy" for name in ("coordinator", "w1", "w2")), rows


def test_plan_refuses_a_running_cluster(running_cluster) -> None:
    result = meshllm("cluster", "plan", "-c", running_cluster)
    assert result.returncode != 0
    assert "is running: a plan measures idle devices; stop it first" in result.stderr


def test_a_plan_killed_before_a_word_says_how_it_ended(cluster_files, tmp_path: Path) -> None:
    # The coordinator's plan process dies by SIGKILL before printing anything (the checks before it pass).
    killer = tmp_path / "killer"
    killer.mkdir()
    (killer / "sitecustomize.py").write_text(
        "import os, signal, sys\nif '--plan-only' in sys.argv:\n    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    devices = [coordinator_device(env={"PYTHONPATH": str(killer)}), worker_device()]
    path = cluster_files.write(devices, name="killed")
    result = meshllm("cluster", "plan", "-c", path)
    assert result.returncode == 1, str(result)
    assert "device 'coordinator': the plan failed (killed by SIGKILL: out of memory?)." in result.error, (
        result
    )
    assert "coordinator.plan.log is empty." in result.error, result
