"""The communicator over mutual TLS: rank processes with certificates of one CA run collectives and
messages; the bytes between two ranks, read through a proxy the test controls, hold neither the token
nor the arrays sent; a rank with a certificate of another CA, or none, is refused at the handshake."""

from __future__ import annotations

import concurrent.futures
from pathlib import Path

import numpy as np
import pytest
from comm_helpers import Cluster, assert_same_everywhere

from meshllm.cluster import certs
from meshllm.runtime.local_workers import free_ports
from meshllm.transport.comm import CommAuthError, CommError, Communicator
from meshllm.transport.tls import TlsFiles
from tests.capture_proxy import CaptureProxy, pieces_found

CA = certs.make_ca("comm")
TOKEN = "comm-token-that-must-never-show-on-the-wire"


def rank_tls(name: str, ca: certs.Pem = CA) -> TlsFiles:
    issued = certs.make_device_cert(ca, name, ["127.0.0.1"])
    return TlsFiles(ca.cert, issued.cert, issued.key)


def write_tls(folder: Path, name: str) -> list[str]:
    files = rank_tls(name)
    paths = [folder / f"{name}-ca.pem", folder / f"{name}.pem", folder / f"{name}.key"]
    for path, data in zip(paths, (files.ca, files.cert, files.key), strict=True):
        certs.write_private(path, data)
    return [str(path) for path in paths]


@pytest.mark.timeout(120)
def test_rank_processes_run_collectives_and_messages_over_tls(tmp_path: Path) -> None:
    tls: list[list[str] | None] = [write_tls(tmp_path, f"rank{rank}") for rank in range(3)]
    cluster = Cluster(3, tmp_path, tokens=[TOKEN] * 3, tls=tls)
    try:
        assert_same_everywhere(cluster.run("all_reduce", op="sum", dtype="float32", shape=[17, 33]))  # ring
        assert_same_everywhere(cluster.run("broadcast", root=1, dtype="int64", shape=[1001]))
        assert cluster.run("ring_send_recv", rounds=5) == [5, 5, 5]
        assert_same_everywhere(cluster.run("all_reduce", op="mean", dtype="float32", shape=[300_000]))
    finally:
        cluster.close()


@pytest.mark.timeout(60)
def test_a_link_between_two_ranks_carries_no_plaintext_array_or_token() -> None:
    ports = free_ports(2)
    # Rank 1 reaches rank 0 through the proxy; rank 0 reaches rank 1 directly.
    proxy = CaptureProxy(f"127.0.0.1:{ports[0]}")
    views = [[f"127.0.0.1:{ports[0]}", f"127.0.0.1:{ports[1]}"], [proxy.address, f"127.0.0.1:{ports[1]}"]]
    array = np.random.default_rng(7).standard_normal(4096).astype(np.float32)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        futures = [
            pool.submit(Communicator, rank, 2, views[rank], token=TOKEN, timeout=20, tls=rank_tls(f"r{rank}"))
            for rank in range(2)
        ]
        comms = [future.result() for future in futures]
    try:
        comms[1].send(array, 0, tag=3)
        np.testing.assert_array_equal(comms[0].recv(1, tag=3), array)
    finally:
        for comm in comms:
            comm.close()
        proxy.close()
    captured = proxy.captured
    assert len(captured) > array.nbytes  # the array crossed the proxy, and the handshake with it
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
