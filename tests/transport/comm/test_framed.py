"""framed.py: the communicator's framed links: the port `Hello` announces, and the hello a link must
open with (token, protocol, rank, world size), each refusal said in READY and raised as the error a
refused `Hello` would raise. Messages over links are tested everywhere else (links are the default)."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import grpc
import pytest
from comm_helpers import start_group

from meshllm.runtime.local_workers import free_ports
from meshllm.transport import frames
from meshllm.transport.comm import CommAuthError, CommError, Communicator
from meshllm.transport.comm.framed import dial_link, link_hello
from meshllm.transport.frames import LinkError
from meshllm.transport.proto import comm_pb2, comm_pb2_grpc


@pytest.fixture
def guarded() -> Iterator[Communicator]:
    """One rank with a token, alone in its group: its link port refuses every hello but takes them all."""
    with Communicator(0, 1, base_port=free_ports(1)[0], token="sesame") as comm:
        yield comm


def link_address(comm: Communicator) -> str:
    return f"127.0.0.1:{comm.link_port}"


@pytest.mark.timeout(30)
def test_hello_announces_the_port_that_takes_links(pair: list[Communicator], transport: str) -> None:
    with grpc.insecure_channel(pair[0].address) as channel:
        reply = comm_pb2_grpc.CommStub(channel).Hello(
            comm_pb2.CommHelloRequest(rank=1, world_size=2), timeout=5
        )
    assert reply.link_port == pair[0].link_port
    assert (reply.link_port > 0) == (transport == "links")


@pytest.mark.timeout(30)
def test_a_given_link_port_is_taken_and_a_busy_one_is_reported() -> None:
    wanted, busy = free_ports(2)
    with Communicator(0, 1, base_port=free_ports(1)[0], link_port=wanted) as comm:
        assert comm.link_port == wanted
    with socket.create_server(("127.0.0.1", busy)):
        with pytest.raises(CommError, match=f"cannot listen for links on 127.0.0.1:{busy}"):
            Communicator(0, 1, base_port=free_ports(1)[0], link_port=busy)


@pytest.mark.timeout(30)
def test_a_wrong_or_missing_token_is_refused_on_the_link_with_comm_auth_error(guarded: Communicator) -> None:
    for token in ["guess", None]:
        with pytest.raises(
            CommAuthError, match="rank 1: rank 0 refused this rank's cluster token"
        ) as refused:
            dial_link(link_address(guarded), link_hello(1, 2, token), None, 5.0, "rank 1: rank 0")
        problem = "no cluster token" if token is None else "a wrong cluster token"
        assert problem in str(refused.value)


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("hello", "expected"),
    [
        ({"protocol": "steps"}, "this port takes communicator links, not 'steps' links"),
        ({"rank": 0}, "rank 0 is not a peer of rank 0"),
        ({"rank": 7}, "rank 7 is not a peer of rank 0"),
        ({"rank": "1"}, "rank '1' is not a peer of rank 0"),
        ({"world_size": 3}, "rank 0 is one of 1 ranks, the caller one of 3"),
    ],
    ids=["another-protocol", "its-own-rank", "no-such-rank", "not-a-number", "another-world-size"],
)
def test_a_hello_that_does_not_fit_is_refused_saying_why(
    guarded: Communicator, hello: dict[str, object], expected: str
) -> None:
    said = {**link_hello(1, 1, "sesame"), **hello}
    with pytest.raises(LinkError, match="rank 0 refuses this link: " + expected):
        frames.dial(link_address(guarded), said, None, 5.0)  # READY's error, as it came
    with pytest.raises(CommError, match="refused this rank's link") as refused:
        dial_link(link_address(guarded), said, None, 5.0, "rank 1: rank 0")
    assert type(refused.value) is CommError and expected in str(refused.value)


@pytest.mark.timeout(30)
def test_a_second_link_from_the_same_rank_is_refused() -> None:
    comms = start_group(2)
    try:
        with pytest.raises(CommError, match="rank 1 has a link to rank 0 already"):
            dial_link(link_address(comms[0]), link_hello(1, 2, None), None, 5.0, "rank 1: rank 0")
    finally:
        for comm in comms:
            comm.close()
