"""The communicator's parts, and its behaviour seen from inside one process.

Ranks here are threads of the test process, each with its own Communicator (own gRPC server and
streams, all on 127.0.0.1). The behaviour across real processes is in test_comm_ranks.py.
"""

from __future__ import annotations

import concurrent.futures
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
import torch

from meshllm.transport.comm import (
    CommAuthError,
    CommError,
    CommTimeoutError,
    Communicator,
)
from meshllm.transport.comm_arrays import ArrayKind, float32_to_bfloat16_bits, payload_of, view_payload
from meshllm.transport.comm_bench import free_ports
from meshllm.transport.comm_mailbox import Payload
from meshllm.transport.comm_outbox import Outbox, OutgoingMessage
from meshllm.transport.comm_wire import (
    GOODBYE,
    SERVICE,
    TOKEN_KEY,
    encode_continuation,
    encode_first_part,
    parse_part,
)
from meshllm.transport.proto import comm_pb2, comm_pb2_grpc

# ---------------------------------------------------------------------------------------------------------
# Helpers


def start_group(world_size: int, **kwargs: Any) -> list[Communicator]:
    """`world_size` communicators in this process, built at once (each waits for the others)."""
    addresses = [f"127.0.0.1:{port}" for port in free_ports(world_size)]
    with concurrent.futures.ThreadPoolExecutor(world_size) as pool:
        futures = [
            pool.submit(Communicator, rank, world_size, addresses, **{"timeout": 10.0, **kwargs})
            for rank in range(world_size)
        ]
        return [future.result() for future in futures]


def on_every_rank(comms: list[Communicator], work: Any) -> list[Any]:
    """Run `work(comm)` on every rank at once; the results by rank (the first error is raised)."""
    with concurrent.futures.ThreadPoolExecutor(len(comms)) as pool:
        return [future.result() for future in [pool.submit(work, comm) for comm in comms]]


@pytest.fixture
def pair() -> Iterator[list[Communicator]]:
    comms = start_group(2)
    yield comms
    for comm in comms:
        comm.close()


# ---------------------------------------------------------------------------------------------------------
# The wire format: hand-written bytes must be what protobuf writes and reads.


def test_a_first_part_reads_as_the_comm_message_it_encodes() -> None:
    payload = Payload(bytes(range(200)), (10, 5), "float32")
    raw = encode_first_part(3, 1, -7, 42, "all_reduce", 2, payload, head=120)
    message = comm_pb2.CommMessage.FromString(raw)
    assert (message.source, message.channel, message.tag, message.seq) == (3, 1, -7, 42)
    assert (message.collective, message.parts) == ("all_reduce", 2)
    assert list(message.tensor.shape) == [10, 5] and message.tensor.dtype == "float32"
    assert message.tensor.data == bytes(range(120))


def test_parts_written_by_protobuf_are_read_back_field_for_field() -> None:
    message = comm_pb2.CommMessage(
        source=5, channel=1, tag=-(2**40), seq=2**35, collective="barrier", parts=3
    )
    message.tensor.data = b"\x01\x02\x03\x04"
    message.tensor.shape.extend([1, 0, 2**33])
    message.tensor.dtype = "bfloat16"
    part = parse_part(message.SerializeToString())
    assert (part.source, part.channel, part.tag, part.seq) == (5, 1, -(2**40), 2**35)
    assert (part.collective, part.parts, part.has_tensor) == ("barrier", 3, True)
    assert part.shape == (1, 0, 2**33) and part.dtype == "bfloat16"
    assert bytes(part.data) == b"\x01\x02\x03\x04"


def test_a_message_without_data_has_no_tensor_and_an_empty_tensor_has_empty_data() -> None:
    assert not parse_part(encode_first_part(0, 1, 0, 0, "barrier", 1, None, 0)).has_tensor
    empty = parse_part(encode_first_part(0, 0, 0, 0, "", 1, Payload(b"", (0,), "int64"), 0))
    assert empty.has_tensor and empty.shape == (0,) and bytes(empty.data) == b""


def test_continuations_and_goodbye_are_comm_messages_too() -> None:
    raw = encode_continuation(memoryview(b"abc" * 1000))
    assert comm_pb2.CommMessage.FromString(raw).data == b"abc" * 1000
    assert bytes(parse_part(raw).data) == b"abc" * 1000
    assert comm_pb2.CommMessage.FromString(GOODBYE).goodbye and parse_part(GOODBYE).goodbye


# ---------------------------------------------------------------------------------------------------------
# Arrays


def test_bfloat16_rounding_matches_torch() -> None:
    rng = np.random.default_rng(0)
    values = np.concatenate(
        [
            rng.standard_normal(10_000).astype(np.float32) * 1000,
            np.array([0.0, -0.0, np.inf, -np.inf, 3.4028235e38, -3.4028235e38, 1e-40, -1e-45], np.float32),
            (np.arange(0x3F800000, 0x3F800000 + 2**17, 2**15, dtype=np.uint32) | 0x8000).view(np.float32),
        ]
    )  # the last are exact ties: rounding to even is what is tested
    expected = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(float32_to_bfloat16_bits(values), expected)
    nan = float32_to_bfloat16_bits(np.array([np.nan, -np.nan], np.float32))
    assert np.isnan((nan.astype(np.uint32) << 16).view(np.float32)).all()


@pytest.mark.parametrize(
    "array",
    [
        np.arange(12, dtype=np.float32).reshape(3, 4),
        np.arange(12, dtype=np.int64).reshape(4, 3)[::2],  # not contiguous
        torch.linspace(-3, 3, 7, dtype=torch.bfloat16),
        torch.arange(6, dtype=torch.int32).reshape(2, 3).t(),
    ],
    ids=["numpy", "numpy-strided", "torch-bfloat16", "torch-transposed"],
)
def test_a_view_payload_holds_the_bytes_the_codec_sends(array: Any) -> None:
    view, copy = view_payload(array), payload_of(array)
    assert bytes(view.data) == copy.data and view.shape == copy.shape and view.dtype == copy.dtype


def test_results_own_writable_data_without_a_copy_and_copy_read_only_data() -> None:
    owned = np.arange(6, dtype=np.float32)
    built = ArrayKind("numpy").build(Payload(owned, (2, 3), "float32"))
    assert np.shares_memory(built, owned) and built.shape == (2, 3)
    received = ArrayKind("numpy").build(Payload(owned.tobytes(), (6,), "float32"))
    assert received.flags.writeable
    as_torch = ArrayKind("torch").build(Payload(np.array([0x3F80, 0xC000], np.uint16), (2,), "bfloat16"))
    assert as_torch.dtype == torch.bfloat16 and as_torch.tolist() == [1.0, -2.0]


# ---------------------------------------------------------------------------------------------------------
# The outbox: order, completion, back-pressure.


def outgoing(size: int) -> OutgoingMessage:
    return OutgoingMessage(
        0, 0, "", Payload(bytes(size), (size // 4,), "float32"), concurrent.futures.Future()
    )


def test_a_message_counts_as_sent_once_grpc_asks_for_the_part_after_it() -> None:
    outbox = Outbox(source=0)
    first, second = outgoing(8), outgoing(8)
    assert outbox.put(first, 1.0) and outbox.put(second, 1.0)
    assert parse_part(next(outbox)).seq == 0 and not first.done.done()
    assert parse_part(next(outbox)).seq == 1 and first.done.done() and not second.done.done()
    outbox.end()
    assert next(outbox) == GOODBYE and second.done.done()
    with pytest.raises(StopIteration):
        next(outbox)


def test_a_full_outbox_makes_the_sender_wait_until_the_peer_takes_something() -> None:
    outbox = Outbox(source=0, limit=16)
    assert outbox.put(outgoing(12), 1.0)
    assert not outbox.put(outgoing(12), 0.1)  # would exceed the limit: times out
    threading.Timer(0.1, lambda: next(outbox)).start()
    assert outbox.put(outgoing(12), 5.0)


def test_a_broken_stream_fails_every_message_not_yet_written() -> None:
    outbox = Outbox(source=0)
    messages = [outgoing(8) for _ in range(3)]
    for message in messages:
        outbox.put(message, 1.0)
    next(outbox)
    outbox.fail(lambda: CommError("gone"))
    assert all(isinstance(message.done.exception(), CommError) for message in messages)
    late = outgoing(8)
    outbox.put(late, 1.0)
    assert isinstance(late.done.exception(), CommError)


# ---------------------------------------------------------------------------------------------------------
# Building a group


def test_arguments_are_checked_before_anything_starts() -> None:
    with pytest.raises(ValueError, match="rank 2 is outside"):
        Communicator(2, 2, ["127.0.0.1:1", "127.0.0.1:2"])
    with pytest.raises(ValueError, match="base_port"):
        Communicator(0, 2)
    with pytest.raises(ValueError, match="1 addresses for 2 ranks"):
        Communicator(0, 2, ["127.0.0.1:1"])
    with pytest.raises(ValueError, match="unknown framework"):
        Communicator(0, 1, ["127.0.0.1:1"], framework="jax")


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


@pytest.mark.timeout(30)
def test_ranks_that_disagree_on_the_world_size_are_refused() -> None:
    a, b, c = (f"127.0.0.1:{port}" for port in free_ports(3))
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        other = pool.submit(Communicator, 1, 2, [a, b], timeout=3.0)
        with pytest.raises(CommError, match="one of 2 ranks"):
            Communicator(0, 3, [a, b, c], timeout=3.0)
        with pytest.raises(CommError):
            other.result()


@pytest.mark.timeout(30)
def test_the_server_refuses_calls_without_the_token() -> None:
    with Communicator(0, 1, base_port=free_ports(1)[0], token="sesame") as comm:
        with grpc.insecure_channel(comm.address) as channel:
            stub = comm_pb2_grpc.CommStub(channel)
            hello = comm_pb2.CommHelloRequest(rank=1, world_size=1)
            for metadata in [(), ((TOKEN_KEY, "open"),)]:
                with pytest.raises(grpc.RpcError) as refused:
                    stub.Hello(hello, metadata=metadata, timeout=5)
                assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            exchange = channel.stream_unary(f"/{SERVICE}/Exchange", request_serializer=None)
            with pytest.raises(grpc.RpcError) as refused:
                exchange(iter([GOODBYE]), metadata=(("x-meshllm-rank", "0"),), timeout=5)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            # With the token the call gets through (and fails for another reason: rank 1 is no peer).
            with pytest.raises(grpc.RpcError) as refused:
                stub.Hello(hello, metadata=((TOKEN_KEY, "sesame"),), timeout=5)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.timeout(30)
def test_a_rank_with_a_wrong_token_cannot_join() -> None:
    addresses = [f"127.0.0.1:{port}" for port in free_ports(2)]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        guarded = pool.submit(Communicator, 0, 2, addresses, token="sesame", timeout=3.0)
        with pytest.raises(CommAuthError, match="refused this rank's cluster token"):
            Communicator(1, 2, addresses, token="guess", timeout=3.0)
        with pytest.raises(CommError):
            guarded.result()


# ---------------------------------------------------------------------------------------------------------
# One rank


@pytest.mark.timeout(30)
def test_a_group_of_one_reduces_to_copies_of_its_input() -> None:
    with Communicator(0, 1, base_port=free_ports(1)[0]) as comm:
        values = np.arange(5, dtype=np.int64)
        for op in ["sum", "max", "min", "mean"]:
            result = comm.all_reduce(values, op=op)
            np.testing.assert_array_equal(result, values)
            assert not np.shares_memory(result, values)
        assert comm.broadcast(values, root=0) is values
        comm.barrier()
        comm.send(values, 0, tag=3)  # to itself
        np.testing.assert_array_equal(comm.recv(0, tag=3), values)


# ---------------------------------------------------------------------------------------------------------
# Two ranks


@pytest.mark.timeout(30)
def test_a_closed_peer_is_closed_not_lost_and_its_last_messages_arrive(pair: list[Communicator]) -> None:
    first, second = pair
    second.send(np.array([1, 2, 3], dtype=np.int32), 0, tag=9)
    second.close()
    np.testing.assert_array_equal(first.recv(1, tag=9), [1, 2, 3])
    started = time.monotonic()
    with pytest.raises(CommError, match="rank 1 .* closed its communicator") as closed:
        first.recv(1, tag=9)
    assert type(closed.value) is CommError and time.monotonic() - started < 2
    with pytest.raises(CommError, match="closed its communicator"):
        first.send(np.zeros(1, np.float32), 1)


@pytest.mark.timeout(30)
def test_isend_completes_once_grpc_took_the_message(pair: list[Communicator]) -> None:
    first, second = pair
    done = first.isend(np.ones(1 << 20, dtype=np.float32), 1, tag=1)
    assert done.result(10) is None
    assert second.recv(0, tag=1).sum() == 1 << 20


@pytest.mark.timeout(30)
def test_an_input_changed_right_after_a_call_does_not_change_what_was_sent(pair: list[Communicator]) -> None:
    first, second = pair
    values = np.zeros(300_000, dtype=np.float32)  # larger than one part and than the ring threshold
    first.send(values, 1)
    values[:] = 7
    assert second.recv(0).sum() == 0

    def reduce_then_scribble(comm: Communicator) -> np.ndarray:
        mine = np.full(300_000, comm.rank + 1, dtype=np.float32)
        result = comm.all_reduce(mine)
        mine[:] = -100  # the other rank may still be reading what this rank sent
        return result

    for result in on_every_rank(pair, reduce_then_scribble):
        assert (result == 3).all() and result.flags.writeable


@pytest.mark.timeout(30)
def test_recv_returns_the_framework_asked_for(pair: list[Communicator]) -> None:
    first, second = pair
    for like, framework in [("torch", "torch"), (torch.zeros(1), "torch"), ("mlx", "mlx"), (None, "numpy")]:
        first.send(np.arange(4, dtype=np.float32), 1)
        got = second.recv(0, like=like)
        assert type(got).__module__.split(".")[0] == framework
        assert got.tolist() == [0.0, 1.0, 2.0, 3.0]


@pytest.mark.timeout(30)
def test_ranks_in_different_collectives_are_told_so(pair: list[Communicator]) -> None:
    first, second = pair
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        rooted = pool.submit(second.broadcast, np.zeros(3, np.float32), 1)
        with pytest.raises(
            CommError, match="collective #0 is all_reduce on this rank but broadcast on rank 1"
        ):
            first.all_reduce(np.zeros(3, np.float32), timeout=5)
        rooted.result()


@pytest.mark.timeout(30)
def test_all_reduce_of_different_shapes_is_refused(pair: list[Communicator]) -> None:
    def reduce(comm: Communicator) -> str:
        try:
            comm.all_reduce(np.zeros(3 + comm.rank, np.float32), timeout=5)
        except CommError as error:
            return str(error)
        return "no error"

    for message in on_every_rank(pair, reduce):
        assert "every rank must pass the same shape and dtype" in message


@pytest.mark.timeout(30)
def test_broadcast_checks_the_array_a_receiver_offers(pair: list[Communicator]) -> None:
    def share(comm: Communicator) -> Any:
        try:
            return comm.broadcast(
                np.arange(4, dtype=np.int64) if comm.rank == 0 else np.zeros(5, np.int64), 0
            )
        except CommError as error:
            return str(error)

    sent, refused = on_every_rank(pair, share)
    assert "the root sent int64 [4], this rank expected int64 [5]" in refused


@pytest.mark.timeout(30)
def test_calls_after_close_fail_at_once() -> None:
    (comm,) = start_group(1)
    comm.close()
    comm.close()  # twice is fine
    with pytest.raises(CommError, match="closed"):
        comm.recv(0)
    with pytest.raises(CommError, match="closed"):
        comm.send(np.zeros(1, np.float32), 0)
