"""Step links over real TCP on 127.0.0.1: stage services started by `serve_stage` in this process, a
`StepChain` in front of them, and raw frames where the test speaks for a misbehaving peer."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from meshllm.cli import event_loop
from meshllm.cluster import certs
from meshllm.runtime.local_workers import free_ports
from meshllm.runtime.stage_host import LocalStageHost
from meshllm.step import LayerRange, PipelineError, SamplingParams, Segment, StageLost, StepInput
from meshllm.transport.frames import LOCAL_LINKS_ENV
from meshllm.transport.proto import meshllm_pb2 as pb
from meshllm.transport.stage import LoadSpec
from meshllm.transport.stage_client import ForwardChain, StageClient, prepare_step
from meshllm.transport.stage_service import serve_stage
from meshllm.transport.step_link import (
    ABORT,
    PROTOCOL,
    RESULT,
    RESULTS,
    STEP,
    StepChain,
    StepLinkError,
    dial,
)
from meshllm.transport.tls import TlsFiles
from tests.transport.test_stage_service import answering

TOKEN = "s3cret"


def device_tls(ca: certs.Pem, name: str) -> TlsFiles:
    issued = certs.make_device_cert(ca, name, ["127.0.0.1"])
    return TlsFiles(ca.cert, issued.cert, issued.key)


@contextlib.asynccontextmanager
async def chain_of_two(
    path: str, second_step_port: int | None = 0, ca: certs.Pem | None = None
) -> AsyncIterator[tuple[list[StageClient], list[asyncio.Task[None]]]]:
    """Two stage services with the tiny checkpoint's layers [0, 2) and [2, 4) loaded, the first sending
    on to the second; the second takes step links on `second_step_port` (None: none). With `ca`, every
    device has a certificate of it (mutual TLS)."""
    addresses = [f"127.0.0.1:{port}" for port in free_ports(2)]
    tls = [device_tls(ca, name) if ca else None for name in ("s0", "s1", "coordinator")]
    servers = [
        asyncio.create_task(
            serve_stage(LocalStageHost(f"s{i}", engine="torch"), address, TOKEN, tls[i], step_port=port)
        )
        for i, (address, port) in enumerate(zip(addresses, (0, second_step_port), strict=True))
    ]
    clients = [StageClient(f"s{i}", address, TOKEN, tls[2]) for i, address in enumerate(addresses)]
    try:
        await answering(clients)
        await clients[1].load(LoadSpec(path, LayerRange(2, 4), "float32"), "", lambda _: None)
        await clients[0].load(LoadSpec(path, LayerRange(0, 2), "float32"), addresses[1], lambda _: None)
        yield clients, servers
    finally:
        for client in clients:
            await client.close()
        for server in servers:
            server.cancel()
        await asyncio.gather(*servers, return_exceptions=True)


def step(step_id: int, seq_id: int, tokens: list[int]) -> pb.StepRequest:
    segments = [Segment(seq_id, 0, len(tokens), sample=True, sampling=SamplingParams(seed=7))]
    return prepare_step(StepInput(step_id, segments, token_ids=np.array(tokens)))


@pytest.mark.parametrize("native_loop", [False, True], ids=["asyncio", "uvloop"])
@pytest.mark.parametrize("secure", [False, True], ids=["plaintext", "mutual-tls"])
def test_steps_over_a_link_sample_what_the_grpc_stream_samples_with_every_stage_timed(
    tiny_checkpoint, secure: bool, native_loop: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On asyncio's event loop and on uvloop's, which `meshllm serve` runs on."""
    monkeypatch.setenv(event_loop.UVLOOP_ENV, "1" if native_loop else "0")
    if native_loop:
        pytest.importorskip("uvloop")

    async def run():
        ca = certs.make_ca("links") if secure else None
        async with chain_of_two(str(tiny_checkpoint()), ca=ca) as (clients, _):
            linked = StepChain(clients, step_timeout=30)
            over_link = [await linked.submit(step(i, 10 + i, [4, 5, 6 + i])) for i in range(3)]
            was_linked = linked.linked
            grpc = ForwardChain(clients, step_timeout=30)
            over_grpc = [await grpc.submit(step(i, 20 + i, [4, 5, 6 + i])) for i in range(3)]
            await linked.reset()
            await grpc.reset()
            return over_link, over_grpc, was_linked

    over_link, over_grpc, was_linked = event_loop.run(run())
    assert was_linked
    assert [r.tokens[0].token_id for r in over_link] == [r.tokens[0].token_id for r in over_grpc]
    assert all([timing.stage for timing in r.timings] == ["s0", "s1"] for r in over_link)


def test_a_stage_without_step_links_leaves_the_chain_on_grpc_with_a_warning(
    tiny_checkpoint, caplog: pytest.LogCaptureFixture
) -> None:
    async def run():
        async with chain_of_two(str(tiny_checkpoint()), second_step_port=None) as (clients, _):
            chain = StepChain(clients, step_timeout=30)
            result = await chain.submit(step(1, 5, [4, 5, 6]))
            linked = chain.linked
            await chain.reset()
            return result, linked

    with caplog.at_level(logging.WARNING, logger="meshllm.transport.step_link"):
        result, linked = asyncio.run(run())
    assert not linked and len(result.tokens) == 1
    warnings = [record.getMessage() for record in caplog.records]
    assert any(
        "steps go over gRPC's Forward stream (slower): worker s0: no step link to the next stage" in message
        and "takes no step links" in message
        for message in warnings
    ), warnings


def test_a_wrong_token_is_refused_at_the_hello_and_a_bad_step_is_answered_by_name(tiny_checkpoint) -> None:
    async def run():
        async with chain_of_two(str(tiny_checkpoint())) as (clients, _):
            info = await clients[1].info()
            address = f"127.0.0.1:{info.step_port}"
            with pytest.raises(StepLinkError, match="worker s1: the step link carried a wrong cluster token"):
                await asyncio.to_thread(dial, address, "wrong")

            def exchange() -> list[tuple[int, bytes]]:
                link = dial(address, TOKEN)
                try:
                    bad = pb.StepRequest(step_id=3)  # hidden states for layers [2, 4), and there are none
                    bad.segments.add(seq_id=1, start_pos=0, n_tokens=2, sample=True)
                    link.send(STEP, bad.SerializeToString())
                    answers = [link.read()]
                    link.send(STEP, b"\xff\xfe not a message")
                    answers.append(link.read())
                    answers.append(link.read())  # then the worker closes the link
                    return answers
                finally:
                    link.close()

            answers = await asyncio.to_thread(exchange)
            still_there = await clients[1].health()  # the worker goes on
            return answers, still_there

    answers, health = asyncio.run(run())
    kind, body = answers[0]
    result = pb.StepResult.FromString(body)
    assert kind == RESULT and result.step_id == 3 and result.error.startswith("worker s1: ")
    assert answers[1] == (ABORT, b"worker s1: a step that is not a StepRequest")
    assert answers[2] is None
    assert health.model


def test_a_stage_that_goes_away_fails_the_next_step_with_its_name(
    tiny_checkpoint,
) -> None:
    async def run():
        async with chain_of_two(str(tiny_checkpoint())) as (clients, servers):
            chain = StepChain(clients, step_timeout=30)
            await chain.submit(step(1, 5, [4, 5, 6]))
            servers[1].cancel()  # the last stage stops: its links close
            await asyncio.gather(servers[1], return_exceptions=True)
            with pytest.raises(StageLost) as lost:
                await chain.submit(step(2, 5, [7]))
            await chain.reset()
            return str(lost.value)

    message = asyncio.run(run())
    # The link closed; opened again, it fails at s0's link onwards, and gRPC's stream names s0 too.
    assert "worker s0: " in message, message


def test_a_tls_link_refuses_plaintext_and_a_certificate_of_another_ca(tiny_checkpoint) -> None:
    async def run() -> list[str]:
        ca = certs.make_ca("links")
        async with chain_of_two(str(tiny_checkpoint()), ca=ca) as (clients, _):
            address = f"127.0.0.1:{(await clients[0].info()).step_port}"
            refusals = []
            for tls in (None, device_tls(certs.make_ca("another"), "stranger")):
                with pytest.raises(StepLinkError) as refused:
                    await asyncio.to_thread(dial, address, TOKEN, tls, 10.0)
                refusals.append(str(refused.value))
            linked = StepChain(clients, step_timeout=30)  # and the worker goes on taking links
            await linked.submit(step(1, 5, [4, 5, 6]))
            assert linked.linked
            await linked.reset()
            return refusals

    plaintext, stranger = asyncio.run(run())
    assert plaintext.startswith("127.0.0.1:") and "closed the link before it was ready" in plaintext
    assert "the TLS handshake failed" in stranger and "CERTIFICATE_VERIFY_FAILED" in stranger, stranger


def test_the_last_stage_answers_the_coordinator_on_a_link_of_its_own_and_failures_still_come_up(
    tiny_checkpoint,
) -> None:
    """Results of a chain of two workers skip the relay through the first; a step the first refuses
    still comes back up its link, named."""

    async def run():
        async with chain_of_two(str(tiny_checkpoint())) as (clients, _):
            chain = StepChain(clients, step_timeout=30)
            results = [await chain.submit(step(i, 10 + i, [4, 5, 6 + i])) for i in range(3)]
            direct, relayed = chain._results.delivered, chain._link.delivered
            bad = pb.StepRequest(step_id=9)  # token ids the first stage needs, missing
            bad.segments.add(seq_id=1, start_pos=0, n_tokens=2, sample=True)
            with pytest.raises(PipelineError) as refused:
                await chain.submit(bad)
            after = await chain.submit(step(10, 20, [4, 5, 6]))
            counts = (direct, relayed, chain._results.delivered, chain._link.delivered)
            await chain.reset()
            return results, counts, str(refused.value), after

    results, counts, refusal, after = asyncio.run(run())
    assert all([timing.stage for timing in r.timings] == ["s0", "s1"] for r in results)
    assert counts == (3, 0, 4, 1)  # three results straight from s1, the refusal up through s0, one more
    assert refusal.startswith("worker s0: "), refusal
    assert len(after.tokens) == 1


def test_a_results_link_is_refused_by_a_stage_that_is_not_last_and_without_the_token(
    tiny_checkpoint,
) -> None:
    async def run() -> list[str]:
        async with chain_of_two(str(tiny_checkpoint())) as (clients, _):
            ports = [(await client.info()).step_port for client in clients]
            refusals = []
            for port, token in ((ports[0], TOKEN), (ports[1], "wrong"), (ports[1], TOKEN)):
                try:
                    link = await asyncio.to_thread(dial, f"127.0.0.1:{port}", token, None, 10.0, "", RESULTS)
                    link.close()
                    refusals.append("")
                except StepLinkError as error:
                    refusals.append(str(error))
            return refusals

    not_last, wrong_token, no_chain = asyncio.run(run())
    assert "worker s0: not the last stage (it sends on to 127.0.0.1:" in not_last, not_last
    assert "worker s1: the step link carried a wrong cluster token" in wrong_token, wrong_token
    assert "worker s1: a results link names no chain" in no_chain, no_chain


def tcp_links_to(ports: set[int]) -> int:
    """TCP connections over IPv4 whose far end is one of `ports`, established, as the kernel lists them."""
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "01" and int(fields[2].rpartition(":")[2], 16) in ports:
            count += 1
    return count


linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="abstract Unix sockets: Linux")


@linux_only
@pytest.mark.parametrize("secure", [False, True], ids=["plaintext", "mutual-tls"])
@pytest.mark.parametrize("local", [True, False], ids=["local-sockets", "MESHLLM_LOCAL_LINKS=0"])
def test_stages_of_one_machine_link_over_local_sockets_and_sample_what_tcp_samples(
    tiny_checkpoint, local: bool, secure: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(LOCAL_LINKS_ENV, "1" if local else "0")

    async def run():
        ca = certs.make_ca("links") if secure else None
        async with chain_of_two(str(tiny_checkpoint()), ca=ca) as (clients, _):
            infos = [await client.info() for client in clients]
            chain = StepChain(clients, step_timeout=30)
            linked = [await chain.submit(step(i, 10 + i, [4, 5, 6 + i])) for i in range(3)]
            families = (chain._link.link.sock.family, chain._results.link.sock.family)
            tcp = tcp_links_to({info.step_port for info in infos})
            grpc = ForwardChain(clients, step_timeout=30)
            over_grpc = [await grpc.submit(step(i, 20 + i, [4, 5, 6 + i])) for i in range(3)]
            await chain.reset()
            await grpc.reset()
            return infos, linked, families, tcp, over_grpc

    infos, linked, families, tcp, over_grpc = event_loop.run(run())
    if local:
        assert all(info.step_socket.startswith("meshllm-") for info in infos), infos
        assert families == (socket.AF_UNIX, socket.AF_UNIX)
        assert tcp == 0  # the first stage's link to the second is local too
    else:
        assert [info.step_socket for info in infos] == ["", ""]
        assert families == (socket.AF_INET, socket.AF_INET)
        assert tcp == 3  # coordinator to s0, s0 to s1, and s1's results link to the coordinator
    assert [r.tokens[0].token_id for r in linked] == [r.tokens[0].token_id for r in over_grpc]


@linux_only
def test_a_local_socket_this_machine_does_not_have_leaves_the_link_on_tcp(tiny_checkpoint) -> None:
    """As for a stage in another network namespace, whose abstract sockets this one cannot see."""

    async def run() -> tuple[socket.AddressFamily, int]:
        async with chain_of_two(str(tiny_checkpoint())) as (clients, _):
            port = (await clients[1].info()).step_port
            elsewhere = "meshllm-" + "0" * 32
            args = (f"127.0.0.1:{port}", TOKEN, None, 10.0, "", PROTOCOL, elsewhere)
            link = await asyncio.to_thread(dial, *args)
            try:
                link.send(STEP, step(1, 5, [4, 5, 6]).SerializeToString())
                frame = await asyncio.to_thread(link.read)
            finally:
                link.close()
            assert frame is not None
            return link.sock.family, frame[0]

    family, kind = asyncio.run(run())
    assert family == socket.AF_INET
    assert kind == RESULT  # hidden states s1 needs are missing: refused, by name, over TCP
