"""The blocking Health and Info calls of the command-line tools, against a real `meshllm worker` on
127.0.0.1: a typed answer, a refused token, a port nobody listens on."""

from __future__ import annotations

import re
import time
from pathlib import Path

import meshllm.cluster
from meshllm import __version__
from meshllm.transport import rpc
from meshllm.transport.probe import stage_health, stage_info
from meshllm.transport.stage import Health
from tests.conftest import free_port


def test_a_healthy_worker_answers_health_with_its_model_and_what_it_does(start_workers) -> None:
    [worker] = start_workers(1, token="secret")
    probe = stage_health(worker.address, "secret")
    assert probe.ok and not probe.refused and probe.error == ""
    assert probe.reply == Health(model="", message="waiting for Load")


def test_info_is_a_stage_info_saying_what_the_stage_has_loaded(start_workers) -> None:
    [worker] = start_workers(1, token="secret")
    probe = stage_info(worker.address, "secret")
    assert probe.ok and probe.reply is not None
    info = probe.reply
    assert (info.model, info.layers, info.num_layers) == ("", None, 0)  # nothing loaded yet
    assert (info.version, info.protocol_version) == (__version__, rpc.PROTOCOL_VERSION)
    assert info.memory_total >= info.memory_available > 0


def test_a_wrong_or_missing_token_is_refused_in_one_line_naming_the_device(start_workers) -> None:
    [worker] = start_workers(1, token="secret")
    for token in ("wrong", None):
        for probe in (stage_health(worker.address, token, device="w1"), stage_info(worker.address, token)):
            assert probe.refused and not probe.ok, probe
            assert "refused the cluster token" in probe.error and "\n" not in probe.error
    assert stage_health(worker.address, "wrong", device="w1").error.startswith(
        f"device 'w1' ({worker.address}) refused the cluster token"
    )


def test_a_port_nobody_listens_on_is_unreachable_and_not_a_refusal() -> None:
    address = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    probe = stage_health(address, "secret", timeout=2.0, device="w9")
    assert time.monotonic() - started < 10
    assert not probe.ok and not probe.refused
    assert probe.error.startswith(f"device 'w9' ({address}) is unreachable (")
    assert probe.error.endswith(f"is `meshllm worker --port {address.rsplit(':', 1)[1]}` running there?")
    assert "\n" not in probe.error
    assert not stage_info(address, None, timeout=2.0).ok


def test_the_cluster_tools_reach_grpc_only_through_this_module() -> None:
    folder = Path(meshllm.cluster.__file__).parent
    grpc_use = re.compile(r"^\s*(import grpc|from grpc\b|.*_pb2)", re.MULTILINE)
    offenders = [path.name for path in sorted(folder.glob("*.py")) if grpc_use.search(path.read_text())]
    assert offenders == []
