"""links.py: starting a rank's server and its links (or streams), falling back to gRPC where a peer takes
no links, noticing a peer that is gone, and closing while a peer does not answer."""

from __future__ import annotations

import concurrent.futures
import logging
import os
import signal
import socket
import time
from pathlib import Path

import numpy as np
import pytest
from comm_helpers import Cluster

from meshllm.runtime.local_workers import free_ports
from meshllm.transport.comm import CommError, CommTimeoutError, Communicator
from meshllm.transport.frames import LOCAL_LINKS_ENV
from tests.capture_proxy import CaptureProxy


@pytest.mark.timeout(30)
def test_a_rank_that_never_starts_is_named_when_the_wait_times_out() -> None:
    addresses = [f"127.0.0.1:{port}" for port in free_ports(2)]
    started = time.monotonic()
    with pytest.raises(CommTimeoutError, match=r"rank 1 \(127\.0\.0\.1:\d+\) did not answer within 0.5 s"):
        Communicator(0, 2, addresses, timeout=0.5)
    assert time.monotonic() - started < 5


@pytest.mark.timeout(30)
def test_a_taken_port_is_reported() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(CommError, match=f"cannot listen on 127.0.0.1:{port}"):
            Communicator(0, 1, [f"127.0.0.1:{port}"])


@pytest.mark.timeout(60)
def test_a_killed_rank_fails_the_others_collective_naming_it(tmp_path: Path) -> None:
    timeout = 15.0
    doomed = 2
    cluster = Cluster(4, tmp_path, timeout=timeout, ring_threshold=1024)
    try:
        cluster.start("all_reduce_until_failure", elements=1 << 18)
        time.sleep(1.0)
        killed_at = time.monotonic()
        cluster.kill(doomed)
        survivors = [0, 1, 3]
        replies = cluster.collect(survivors, timeout + 5)
        elapsed = time.monotonic() - killed_at
    finally:
        cluster.close()
    for rank, reply in zip(survivors, replies, strict=True):
        assert not reply["ok"], f"rank {rank} did not notice: {reply}"
        assert reply["error"].startswith("PeerLostError"), reply["error"]
        assert f"rank {doomed} " in reply["error"], reply["error"]
    assert elapsed < timeout


@pytest.mark.timeout(60)
@pytest.mark.parametrize("links", [True, False], ids=["links", "grpc"])
def test_a_receive_from_a_killed_rank_fails_at_once_naming_it(tmp_path: Path, links: bool) -> None:
    timeout = 15.0
    cluster = Cluster(2, tmp_path, timeout=timeout, links=[links] * 2)
    try:
        cluster.start("recv_once", ranks=[0], source=1, tag=3)
        time.sleep(0.5)
        killed_at = time.monotonic()
        cluster.kill(1)
        (reply,) = cluster.collect([0], timeout + 5)
        elapsed = time.monotonic() - killed_at
    finally:
        cluster.close()
    assert not reply["ok"] and reply["error"].startswith("PeerLostError"), reply
    assert "recv with tag 3" in reply["error"] and "rank 1 " in reply["error"], reply["error"]
    assert elapsed < timeout / 2


@pytest.mark.timeout(60)
def test_a_rank_that_takes_no_links_is_sent_to_over_grpc_with_one_warning(tmp_path: Path) -> None:
    cluster = Cluster(2, tmp_path, links=[True, False])
    try:
        assert cluster.run("ring_send_recv", rounds=3) == [3, 3]
    finally:
        cluster.close()
    linked, unlinked = ((tmp_path / f"rank{rank}.log").read_text() for rank in range(2))
    assert linked.count("go over its gRPC stream") == 1
    assert "messages to rank 1 (127.0.0.1:" in linked and "it takes no links (MESHLLM_LINKS=0 there" in linked
    assert unlinked.count("MESHLLM_LINKS=0: messages go over gRPC streams") == 1


@pytest.mark.timeout(60)
def test_close_returns_while_a_peer_is_stopped(tmp_path: Path) -> None:
    cluster = Cluster(2, tmp_path)
    try:
        assert cluster.run("ring_send_recv", rounds=2) == [2, 2]
        os.kill(cluster.processes[1].pid, signal.SIGSTOP)
        cluster.start("close", ranks=[0], timeout=1.0)
        (reply,) = cluster.collect([0], 20)
        os.kill(cluster.processes[1].pid, signal.SIGCONT)
    finally:
        cluster.kill(1)
        cluster.close()
    assert reply["ok"] and reply["result"] < 5.0, reply


@pytest.mark.timeout(30)
def test_a_link_that_cannot_be_opened_leaves_that_peer_on_grpc_with_a_warning(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(LOCAL_LINKS_ENV, "0")  # rank 0's local socket would be found beside the proxy
    grpc_port, joining_port = free_ports(2)
    # Rank 1 reaches rank 0's gRPC port through a proxy on 127.0.0.2, where nothing takes rank 0's links.
    proxy = CaptureProxy(f"127.0.0.1:{grpc_port}", listen=("127.0.0.2", grpc_port))
    addresses = [f"127.0.0.1:{grpc_port}", f"127.0.0.1:{joining_port}"]
    views = [addresses, [proxy.address, addresses[1]]]
    array = np.arange(50_000, dtype=np.float32)
    with caplog.at_level(logging.WARNING), concurrent.futures.ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(Communicator, rank, 2, views[rank], timeout=10.0) for rank in range(2)]
        comms = [future.result() for future in futures]
    try:
        comms[1].send(array, 0, tag=1)
        comms[0].send(array * 2, 1, tag=1)
        np.testing.assert_array_equal(comms[0].recv(1, tag=1), array)
        np.testing.assert_array_equal(comms[1].recv(0, tag=1), array * 2)
    finally:
        for comm in comms:
            comm.close()
        proxy.close()
    warnings = [record.getMessage() for record in caplog.records if "gRPC stream" in record.getMessage()]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(f"rank 1: messages to rank 0 ({proxy.address}) go over its gRPC stream")
    assert f"no link to 127.0.0.2:{comms[0].link_port}: cannot connect" in warnings[0]
    assert len(proxy.captured) > array.nbytes  # rank 1's message went over gRPC, through the proxy


@pytest.mark.skipif(not os.uname().sysname == "Linux", reason="abstract Unix sockets: Linux")
@pytest.mark.timeout(60)
@pytest.mark.parametrize("local", [True, False], ids=["local-sockets", "MESHLLM_LOCAL_LINKS=0"])
def test_ranks_of_one_machine_link_over_local_sockets(local: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(LOCAL_LINKS_ENV, "1" if local else "0")
    addresses = [f"127.0.0.1:{port}" for port in free_ports(2)]
    array = np.arange(70_000, dtype=np.float32)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(Communicator, rank, 2, addresses, timeout=10.0) for rank in range(2)]
        comms = [future.result() for future in futures]
    try:
        families = [comm._links._senders[1 - comm.rank].link.sock.family for comm in comms]
        comms[1].send(array, 0, tag=1)
        comms[0].send(array * 2, 1, tag=1)
        np.testing.assert_array_equal(comms[0].recv(1, tag=1), array)
        np.testing.assert_array_equal(comms[1].recv(0, tag=1), array * 2)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            totals = list(pool.map(lambda comm: comm.all_reduce(array[:1000] * (comm.rank + 1)), comms))
    finally:
        for comm in comms:
            comm.close()
    assert families == [socket.AF_UNIX if local else socket.AF_INET] * 2
    for total in totals:
        np.testing.assert_array_equal(total, array[:1000] * 3)
