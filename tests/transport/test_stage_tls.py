"""Mutual TLS on the stage links, over real gRPC on 127.0.0.1 in this process: two stage services with
certificates of one cluster CA pass a step along; a caller without a certificate of that CA, a plaintext
caller, a TLS caller of a plaintext stage and a certificate that names another host are each refused at
the handshake with one sentence that names the device and the fix. The cluster token is still checked."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from meshllm.cluster import certs
from meshllm.errors import ConfigError, StageError
from meshllm.runtime.local_workers import free_ports
from meshllm.runtime.stage_host import LocalStageHost
from meshllm.step import LayerRange, SamplingParams, Segment, StepInput
from meshllm.transport.probe import stage_health
from meshllm.transport.stage import LoadSpec
from meshllm.transport.stage_client import ForwardChain, StageClient, TokenRefused, prepare_step
from meshllm.transport.stage_service import serve_stage
from meshllm.transport.tls import TlsFiles

TOKEN = "s3cret"
CA = certs.make_ca("test")


def device_tls(name: str, hosts: list[str] | None = None, ca: certs.Pem = CA) -> TlsFiles:
    issued = certs.make_device_cert(ca, name, hosts or ["127.0.0.1"])
    return TlsFiles(ca.cert, issued.cert, issued.key)


@contextlib.asynccontextmanager
async def served(tls: list[TlsFiles | None]) -> AsyncIterator[list[str]]:
    """One stage service per entry of `tls` (its certificates, or None: plaintext); their addresses."""
    addresses = [f"127.0.0.1:{port}" for port in free_ports(len(tls))]
    servers = [
        asyncio.create_task(
            serve_stage(LocalStageHost(f"s{i}", engine="torch"), address, token=TOKEN, tls=files)
        )
        for i, (address, files) in enumerate(zip(addresses, tls, strict=True))
    ]
    try:
        for address in addresses:  # listening: a TCP connection is accepted
            for _ in range(200):
                with contextlib.suppress(OSError):
                    _, writer = await asyncio.open_connection(*address.split(":"))
                    writer.close()
                    break
                await asyncio.sleep(0.05)
        yield addresses
    finally:
        for server in servers:
            server.cancel()
        await asyncio.gather(*servers, return_exceptions=True)


async def info_error(client: StageClient) -> str:
    try:
        with pytest.raises(StageError) as caught:
            await client.info(timeout=10)
        return str(caught.value)
    finally:
        await client.close()


def test_a_step_passes_two_tls_stages_and_comes_back_sampled(tiny_checkpoint) -> None:
    path = str(tiny_checkpoint())
    coordinator = device_tls("coordinator")

    async def run():
        async with served([device_tls("s0"), device_tls("s1")]) as (a, b):
            first, second = StageClient("s0", a, TOKEN, coordinator), StageClient("s1", b, TOKEN, coordinator)
            await second.load(LoadSpec(path, LayerRange(2, 4), "float32"), "", print)
            await first.load(LoadSpec(path, LayerRange(0, 2), "float32"), second.address, print)
            chain = ForwardChain([first, second], step_timeout=30)
            segments = [Segment(5, 0, 3, sample=True, sampling=SamplingParams(seed=1))]
            result = await chain.submit(prepare_step(StepInput(1, segments, token_ids=np.array([4, 5, 6]))))
            await chain.reset()
            for client in (first, second):
                await client.close()
            return result

    result = asyncio.run(run())
    assert [token.seq_id for token in result.tokens] == [5]
    assert [timing.stage for timing in result.timings] == ["s0", "s1"]


def test_a_caller_with_a_certificate_of_another_ca_is_refused_at_the_handshake() -> None:
    stranger = device_tls("stranger", ca=certs.make_ca("other"))
    own_ca_foreign_cert = TlsFiles(CA.cert, stranger.cert, stranger.key)  # trusts s0, s0 does not trust it

    async def run() -> list[str]:
        async with served([device_tls("s0")]) as (address,):
            return [
                await info_error(StageClient("s0", address, TOKEN, stranger)),
                await info_error(StageClient("s0", address, TOKEN, own_ca_foreign_cert)),
                await info_error(StageClient("s0", address, TOKEN)),  # plaintext
            ]

    other_ca, foreign_cert, plaintext = asyncio.run(run())
    assert other_ca.startswith("device 's0' (127.0.0.1:") and "failed the TLS handshake" in other_ca
    assert "not signed by the cluster CA" in other_ca and "--tls-ca" in other_ca
    assert "closed the connection during the TLS handshake" in foreign_cert
    assert "certificate signed by the device's cluster CA" in foreign_cert and "--tls-cert" in foreign_cert
    assert "probably requires mutual TLS" in plaintext and "--tls-key" in plaintext


def test_tls_to_a_plaintext_stage_and_a_certificate_for_another_host_are_named() -> None:
    coordinator = device_tls("coordinator")

    async def run() -> list[str]:
        async with served([None, device_tls("s1", hosts=["10.9.9.9", "mini2.local"])]) as (plain, elsewhere):
            return [
                await info_error(StageClient("s0", plain, TOKEN, coordinator)),
                await info_error(StageClient("s1", elsewhere, TOKEN, coordinator)),
            ]

    plain, elsewhere = asyncio.run(run())
    assert plain.startswith("device 's0'") and "speaks plaintext, not TLS" in plain and "--insecure" in plain
    assert elsewhere.startswith("device 's1'") and "does not name the host this process dials" in elsewhere


def test_the_token_is_still_required_over_tls() -> None:
    async def run() -> None:
        async with served([device_tls("s0")]) as (address,):
            client = StageClient("s0", address, "wrong", device_tls("coordinator"))
            try:
                await client.info(timeout=10)
            finally:
                await client.close()

    with pytest.raises(TokenRefused, match=r"device 's0' .* refused the cluster token"):
        asyncio.run(run())


def test_the_blocking_probe_speaks_tls_and_says_why_a_plaintext_one_fails() -> None:
    async def run() -> list[object]:
        async with served([device_tls("s0")]) as (address,):
            loop = asyncio.get_running_loop()
            secure = await loop.run_in_executor(
                None, lambda: stage_health(address, TOKEN, 10, "w1", device_tls("cli"))
            )
            plain = await loop.run_in_executor(None, lambda: stage_health(address, TOKEN, 10, "w1"))
            return [secure, plain]

    secure, plain = asyncio.run(run())
    assert secure.ok, secure  # type: ignore[attr-defined]
    assert not plain.ok and "device 'w1'" in plain.error and "mutual TLS" in plain.error  # type: ignore[attr-defined]


def test_certificates_name_their_hosts_and_chain_to_their_ca(tmp_path: Path) -> None:
    issued = certs.make_device_cert(CA, "w1", ["192.168.1.12", "mini2.local"])
    assert certs.names_of(issued.cert) == {"192.168.1.12", "mini2.local"}
    assert certs.signed_by(issued.cert, CA.cert)
    assert not certs.signed_by(issued.cert, certs.make_ca("other").cert)
    assert certs.still_valid(issued.cert)
    key = tmp_path / "w1.key"
    certs.write_private(key, issued.key)
    assert key.stat().st_mode & 0o777 == 0o600


def test_the_flags_need_all_three_files_and_pem_contents(tmp_path: Path) -> None:
    assert TlsFiles.from_options(None, None, None) is None
    with pytest.raises(ConfigError, match="--tls-ca given without --tls-cert, --tls-key"):
        TlsFiles.from_options("ca.pem", None, None)
    (tmp_path / "ca.pem").write_text("not a certificate")
    with pytest.raises(ConfigError, match=r"--tls-ca '.*ca.pem': not a PEM file"):
        TlsFiles.from_options(str(tmp_path / "ca.pem"), str(tmp_path / "c"), str(tmp_path / "k"))
    with pytest.raises(ConfigError, match=r"--tls-ca '.*missing.pem': No such file"):
        TlsFiles.from_options(str(tmp_path / "missing.pem"), str(tmp_path / "c"), str(tmp_path / "k"))
