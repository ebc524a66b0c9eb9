"""The communicator over mutual TLS, on framed links and on gRPC streams: rank processes with
certificates of one CA run collectives and messages (large ones too); the bytes between two ranks, read
through proxies the test controls, hold neither the token nor the arrays sent; a rank with a certificate
of another CA, or none, is refused at the handshake, on the gRPC port and on the link port alike."""

from __future__ import annotations

import concurrent.futures
from pathlib import Path

import numpy as np
import pytest
from comm_helpers import Cluster, assert_same_everywhere

from meshllm.cluster import certs
from meshllm.runtime.local_workers import free_ports
from meshllm.transport.comm import CommAuthError, CommError, Communicator
from meshllm.transport.comm.framed import dial_link, link_hello
from meshllm.transport.frames import LINKS_ENV, LOCAL_LINKS_ENV, LinkError
from meshllm.transport.tls import TlsFiles
from tests.capture_proxy import CaptureProxy, pieces_found

CA = certs.make_ca("comm")
TOKEN = "comm-token-that-must-never-show-on-the-wire"


def rank_tls(name: str, ca: certs.Pem = CA, trusted: certs.Pem | None = None) -> TlsFiles:
    """Certificates for 127.0.0.1 (and 127.0.0.2) issued by `ca`, trusting `trusted` (default: `ca`)."""
    issued = certs.make_device_cert(ca, name, ["127.0.0.1", "127.0.0.2"])
    return TlsFiles((trusted or ca).cert, issued.cert, issued.key)


def write_tls(folder: Path, name: str) -> list[str]:
    files = rank_tls(name)
    paths = [folder / f"{name}-ca.pem", folder / f"{name}.pem", folder / f"{name}.key"]
    for path, data in zip(paths, (files.ca, files.cert, files.key), strict=True):
        certs.write_private(path, data)
    return [str(path) for path in paths]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("links", [True, False], ids=["links", "grpc"])
def test_rank_processes_run_collectives_and_messages_over_tls(tmp_path: Path, links: bool) -> None:
    tls: list[list[str] | None] = [write_tls(tmp_path, f"rank{rank}") for rank in range(3)]
    cluster = Cluster(3, tmp_path, tokens=[TOKEN] * 3, tls=tls, links=[links] * 3)
    try:
        assert_same_everywhere(cluster.run("all_reduce", op="sum", dtype="float32", shape=[17, 33]))  # ring
        assert_same_everywhere(cluster.run("broadcast", root=1, dtype="int64", shape=[1001]))
        assert cluster.run("ring_send_recv", rounds=5) == [5, 5, 5]
        assert_same_everywhere(cluster.run("all_reduce", op="mean", dtype="float32", shape=[300_000]))
        assert_same_everywhere(cluster.run("large", elements=(5 << 20) // 4 + 3))  # 5 MiB: in parts
    finally:
        cluster.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("links", [True, False], ids=["links", "grpc"])
def test_the_bytes_between_two_ranks_carry_no_plaintext_array_or_token(
    links: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(LINKS_ENV, "1" if links else "0")
    monkeypatch.setenv(LOCAL_LINKS_ENV, "0")  # the links cross the proxy, not a local socket beside it
    grpc_port, link_port, joining_port = free_ports(3)
    # Rank 1 sees rank 0 at 127.0.0.2, where two proxies relay its gRPC port and its link port to
    # 127.0.0.1; rank 0 reaches rank 1 directly. Rank 1's messages to rank 0 cross a proxy either way.
    proxies = [
        CaptureProxy(f"127.0.0.1:{port}", listen=("127.0.0.2", port)) for port in (grpc_port, link_port)
    ]
    addresses = [f"127.0.0.1:{grpc_port}", f"127.0.0.1:{joining_port}"]
    views = [addresses, [proxies[0].address, addresses[1]]]
    array = np.random.default_rng(7).standard_normal(4096).astype(np.float32)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        futures = [
            pool.submit(
                Communicator, rank, 2, views[rank], token=TOKEN, timeout=20, tls=rank_tls(f"r{rank}"),
                link_port=link_port if rank == 0 else 0,
            )
            for rank in range(2)
        ]  # fmt: skip
        comms = [future.result() for future in futures]
    try:
        comms[1].send(array, 0, tag=3)
        np.testing.assert_array_equal(comms[0].recv(1, tag=3), array)
    finally:
        for comm in comms:
            comm.close()
        for proxy in proxies:
            proxy.close()
    grpc_bytes, link_bytes = (proxy.captured for proxy in proxies)
    carrier = link_bytes if links else grpc_bytes
    assert len(carrier) > array.nbytes  # the array crossed this proxy, and the handshake with it
    assert len(link_bytes) == 0 if not links else len(grpc_bytes) < array.nbytes
    for captured in (grpc_bytes, link_bytes):
        assert TOKEN.encode() not in captured
        assert pieces_found(captured, array.tobytes(), 16) == 0


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("joining", "expected"),
    [
        (rank_tls("intruder", ca=certs.make_ca("other")), "failed the TLS handshake"),
        (None, "probably requires mutual TLS"),
    ],
    ids=["another-ca", "plaintext"],
)
def test_a_rank_without_the_cluster_certificate_is_refused_at_the_handshake(
    joining: TlsFiles | None, expected: str
) -> None:
    guarded_port, joining_port, nowhere = free_ports(3)
    addresses = [f"127.0.0.1:{guarded_port}", f"127.0.0.1:{joining_port}"]
    # Rank 0 looks for rank 1 where nothing listens, so it keeps its server up while rank 1 is refused.
    guarded_view = [addresses[0], f"127.0.0.1:{nowhere}"]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        guarded = pool.submit(Communicator, 0, 2, guarded_view, token=TOKEN, timeout=8.0, tls=rank_tls("r0"))
        with pytest.raises(CommAuthError, match=expected) as refused:
            Communicator(1, 2, addresses, token=TOKEN, timeout=3.0, tls=joining)
        assert "rank 1:" in str(refused.value) and "--tls-" in str(refused.value)
        with pytest.raises(CommError):
            guarded.result()


@pytest.mark.timeout(60)
def test_a_caller_without_the_cluster_certificate_gets_no_link() -> None:
    with Communicator(0, 1, base_port=free_ports(1)[0], token=TOKEN, tls=rank_tls("r0")) as guarded:
        address = f"127.0.0.1:{guarded.link_port}"
        hello = link_hello(1, 1, TOKEN)  # a hello rank 0 would refuse only for its rank

        def dial(tls: TlsFiles | None) -> None:
            dial_link(address, hello, tls, 5.0, "rank 1: rank 0")

        # A caller that trusts another CA refuses rank 0's certificate itself.
        with pytest.raises(CommAuthError, match="rank 1: rank 0 failed the TLS handshake"):
            dial(rank_tls("intruder", ca=certs.make_ca("other")))
        # One that trusts the cluster CA but holds a certificate of another is cut off by rank 0 before
        # any READY; so is a caller in plaintext.
        for tls in [rank_tls("intruder", ca=certs.make_ca("other"), trusted=CA), None]:
            with pytest.raises(LinkError, match="closed the link before it was ready"):
                dial(tls)
        # A certificate of the cluster CA gets through the handshake, to rank 0's own checks.
        with pytest.raises(CommError, match="rank 1 is not a peer of rank 0"):
            dial(rank_tls("r1"))
