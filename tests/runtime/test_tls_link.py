"""A stage link over mutual TLS, for real: a `meshllm worker` process with the cluster's certificates, a
coordinator with its own, and between them a TCP proxy the test controls that keeps every byte.

The same run in plaintext shows that the capture would find them: there the token and the activations
the coordinator's stage sends (computed again here, bit for bit) are on the wire. Over TLS the greedy
tokens are the same, and the capture holds neither the token nor any 16-byte run of those activations.
A caller without a certificate of the cluster CA is refused at the handshake, and the worker goes on.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from meshllm.cluster import certs
from meshllm.engines.torch import load_stage
from meshllm.errors import StageError
from meshllm.runtime.coordinator import Coordinator
from meshllm.runtime.coordinator_config import CoordinatorConfig, WorkerAddress
from meshllm.runtime.engine_client import GenerateRequest
from meshllm.step import SamplingParams, Segment, StepInput
from meshllm.transport.frames import LINKS_ENV
from meshllm.transport.stage_client import StageClient
from meshllm.transport.tls import TlsFiles
from tests.capture_proxy import CaptureProxy, pieces_found
from tests.conftest import WorkerProcess

TOKEN = "cluster-token-NOT-for-the-wire-4f1c9a"
PROMPT = [5, 17, 42, 99, 3, 250, 7, 61, 128, 11, 300, 12]
WINDOW = 16  # bytes: four float32 values in a row


def write_device(folder: Path, ca: certs.Pem, name: str) -> tuple[TlsFiles, list[str]]:
    """The device's certificates written to `folder` (keys 0600); its TlsFiles and worker flags."""
    issued = certs.make_device_cert(ca, name, ["127.0.0.1"])
    paths = {"ca": folder / "ca.pem", "cert": folder / f"{name}.pem", "key": folder / f"{name}.key"}
    for kind, data in (("ca", ca.cert), ("cert", issued.cert), ("key", issued.key)):
        certs.write_private(paths[kind], data)
    flags = ["--tls-ca", str(paths["ca"]), "--tls-cert", str(paths["cert"]), "--tls-key", str(paths["key"])]
    return TlsFiles(ca.cert, issued.cert, issued.key), flags


def first_stage_activations(path: Path) -> bytes:
    """What the coordinator's stage (layers [0, 1)) sends on for PROMPT's prefill, as float32 bytes."""
    stage = load_stage(str(path), (0, 1))
    output = stage.forward(StepInput(0, [Segment(1, 0, len(PROMPT))], token_ids=np.asarray(PROMPT)))
    hidden = output.hidden_states
    hidden = hidden.numpy() if hasattr(hidden, "numpy") else np.asarray(hidden)
    assert hidden.dtype == np.float32 and hidden.shape[0] == len(PROMPT)
    return hidden.tobytes()


def run_through_proxy(path: Path, worker: WorkerProcess, tls: TlsFiles | None) -> tuple[list[int], bytes]:
    """Greedy tokens of PROMPT with the coordinator dialling the worker through a capturing proxy."""
    proxy = CaptureProxy(worker.address)

    async def run() -> list[int]:
        config = CoordinatorConfig(
            model=str(path),
            workers=(WorkerAddress("w1", proxy.address),),
            token=TOKEN,
            tls=tls,
            layer_overrides={"coordinator": (0, 1), "w1": (1, 4)},
            engine="torch",  # the engine `first_stage_activations` computes them on
        )
        coordinator = await Coordinator.start(config)
        try:
            request = GenerateRequest(PROMPT, SamplingParams(), 6, ignore_eos=True)
            return [token.token_id async for token in coordinator.generate(request)]
        finally:
            await coordinator.close()

    try:
        return asyncio.run(run()), proxy.captured
    finally:
        proxy.close()


@pytest.mark.timeout(240)
def test_a_stage_link_carries_no_plaintext_activation_or_token(
    tiny_checkpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # In plaintext, steps would take the worker's step link, which the proxy does not stand in front
    # of: on gRPC, both runs put their steps through the proxy.
    monkeypatch.setenv(LINKS_ENV, "0")
    path = tiny_checkpoint("qwen3")
    activations = first_stage_activations(path)
    pieces = len(activations) // WINDOW
    ca = certs.make_ca("capture")
    coordinator_tls, _ = write_device(tmp_path, ca, "coordinator")
    _, worker_flags = write_device(tmp_path, ca, "w1")

    plain_worker = WorkerProcess("w1", token=TOKEN)
    tls_worker = WorkerProcess("w1", token=TOKEN, args=worker_flags)
    try:
        plain_worker.wait_ready()
        tls_worker.wait_ready()
        plain_tokens, plain_bytes = run_through_proxy(path, plain_worker, None)
        tls_tokens, tls_bytes = run_through_proxy(path, tls_worker, coordinator_tls)
        log = tls_worker.log_tail()
    finally:
        plain_worker.kill()
        tls_worker.kill()

    # The capture works: in plaintext the token and the activations are there to be read.
    assert TOKEN.encode() in plain_bytes
    assert pieces_found(plain_bytes, activations, WINDOW) > pieces * 0.9
    # Over TLS: the same tokens, and nothing of either on the wire.
    assert tls_tokens == plain_tokens
    assert len(tls_bytes) > len(activations)  # the activations did cross this link, encrypted
    assert TOKEN.encode() not in tls_bytes
    assert pieces_found(tls_bytes, activations, WINDOW) == 0
    assert "mutual TLS" in log


@pytest.mark.timeout(180)
def test_a_caller_without_the_cluster_certificate_is_refused_and_the_worker_serves_on(tmp_path: Path) -> None:
    ca = certs.make_ca("refusal")
    coordinator_tls, _ = write_device(tmp_path, ca, "coordinator")
    _, worker_flags = write_device(tmp_path, ca, "w1")
    other = certs.make_ca("another cluster")
    stranger = certs.make_device_cert(other, "stranger", ["127.0.0.1"])
    worker = WorkerProcess("w1", token=TOKEN, args=worker_flags)

    async def ask(tls: TlsFiles | None) -> str:
        client = StageClient("w1", worker.address, TOKEN, tls)
        try:
            info = await client.info(timeout=30)
            return f"answered: {info.hostname}"
        except StageError as error:
            return str(error)
        finally:
            await client.close()

    try:
        worker.wait_ready()
        foreign = asyncio.run(ask(TlsFiles(other.cert, stranger.cert, stranger.key)))
        plaintext = asyncio.run(ask(None))
        member = asyncio.run(ask(coordinator_tls))
        alive = worker.process.poll() is None
    finally:
        worker.kill()
    assert foreign.startswith(f"device 'w1' ({worker.address}) failed the TLS handshake"), foreign
    assert "--tls-ca" in foreign and "meshllm cluster start" in foreign
    assert plaintext.startswith(f"device 'w1' ({worker.address}) closed the connection"), plaintext
    assert "mutual TLS" in plaintext
    assert member.startswith("answered: ") and alive
