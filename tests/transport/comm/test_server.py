"""server.py: the `Comm` service refuses calls without the cluster token, and ranks of another group."""

from __future__ import annotations

import concurrent.futures
from pathlib import Path

import grpc
import pytest
from comm_helpers import Cluster

from meshllm.runtime.local_workers import free_ports
from meshllm.transport.comm import CommAuthError, CommError, Communicator
from meshllm.transport.comm.wire import GOODBYE, SERVICE
from meshllm.transport.proto import comm_pb2, comm_pb2_grpc
from meshllm.transport.rpc import TOKEN_METADATA_KEY


@pytest.mark.timeout(30)
def test_the_server_refuses_calls_without_the_token() -> None:
    with Communicator(0, 1, base_port=free_ports(1)[0], token="sesame") as comm:
        with grpc.insecure_channel(comm.address) as channel:
            stub = comm_pb2_grpc.CommStub(channel)
            hello = comm_pb2.CommHelloRequest(rank=1, world_size=1)
            for metadata in [(), ((TOKEN_METADATA_KEY, "open"),)]:
                with pytest.raises(grpc.RpcError) as refused:
                    stub.Hello(hello, metadata=metadata, timeout=5)
                assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            exchange = channel.stream_unary(f"/{SERVICE}/Exchange", request_serializer=None)
            with pytest.raises(grpc.RpcError) as refused:
                exchange(iter([GOODBYE]), metadata=(("x-meshllm-rank", "0"),), timeout=5)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            # With the token the call gets through (and fails for another reason: rank 1 is no peer).
            with pytest.raises(grpc.RpcError) as refused:
                stub.Hello(hello, metadata=((TOKEN_METADATA_KEY, "sesame"),), timeout=5)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.timeout(30)
def test_a_rank_with_a_wrong_token_cannot_join() -> None:
    guarded_port, joining_port, nowhere = free_ports(3)
    addresses = [f"127.0.0.1:{guarded_port}", f"127.0.0.1:{joining_port}"]
    # Rank 0 looks for rank 1 where nothing listens: were its Hello refused by rank 1 first, it would stop
    # its server before rank 1's Hello arrived, and rank 1 would see a timeout instead of the refusal.
    guarded_view = [addresses[0], f"127.0.0.1:{nowhere}"]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        guarded = pool.submit(Communicator, 0, 2, guarded_view, token="sesame", timeout=3.0)
        with pytest.raises(CommAuthError, match="refused this rank's cluster token"):
            Communicator(1, 2, addresses, token="guess", timeout=3.0)
        with pytest.raises(CommError):
            guarded.result()


@pytest.mark.timeout(60)
def test_a_rank_without_the_token_is_refused(tmp_path: Path) -> None:
    cluster = Cluster(2, tmp_path, tokens=["sesame", None], timeout=10.0, wait_ready=False)
    try:
        refused = cluster.collect([1], 40)[0]
    finally:
        cluster.kill(0)
        cluster.close()
    assert not refused["ok"]
    assert refused["error"].startswith("CommAuthError"), refused["error"]
    assert "rank 0" in refused["error"] and "token" in refused["error"]


@pytest.mark.timeout(30)
def test_ranks_that_disagree_on_the_world_size_are_refused() -> None:
    a, b, c, nowhere = (f"127.0.0.1:{port}" for port in free_ports(4))
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        # Rank 1 looks for rank 0 where nothing listens, so it cannot be refused (and stop) first.
        other = pool.submit(Communicator, 1, 2, [nowhere, b], timeout=3.0)
        with pytest.raises(CommError, match="one of 2 ranks"):
            Communicator(0, 3, [a, b, c], timeout=3.0)
        with pytest.raises(CommError):
            other.result()
