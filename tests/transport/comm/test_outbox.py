"""outbox.py: the queue of messages for one peer: order, completion, back-pressure, and the small
messages a caller writes itself (`claim`)."""

from __future__ import annotations

import concurrent.futures
import threading

import pytest

from meshllm.transport.comm.errors import CommError
from meshllm.transport.comm.outbox import PART_BYTES, Outbox, OutgoingMessage
from meshllm.transport.comm.wire import GOODBYE, Payload, parse_part


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


def test_a_claimed_message_keeps_its_place_and_the_thread_waits_until_it_is_written() -> None:
    outbox = Outbox(source=0)
    claimed, queued = outgoing(8), outgoing(8)
    part = outbox.claim(claimed)
    assert part is not None and parse_part(part).seq == 0
    assert outbox.claim(outgoing(8)) is None  # one writer at a time
    assert outbox.put(queued, 1.0)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        taken = pool.submit(next, outbox)
        assert not taken.done() and not claimed.done.done()
        outbox.release(claimed)
        assert parse_part(taken.result(5)).seq == 1
    assert claimed.done.done() and not queued.done.done()


def test_only_a_one_part_message_sent_while_nothing_is_queued_is_claimed() -> None:
    outbox = Outbox(source=0)
    assert outbox.claim(outgoing(PART_BYTES + 4)) is None
    assert outbox.put(outgoing(8), 1.0)
    assert outbox.claim(outgoing(8)) is None  # behind a queued message: it waits its turn
    next(outbox)  # the thread takes it; it is written once the thread asks again
    assert outbox.claim(outgoing(8)) is None
    outbox.end()
    assert next(outbox) == GOODBYE and outbox.claim(outgoing(8)) is None


def test_a_failure_while_a_message_is_claimed_fails_it() -> None:
    outbox = Outbox(source=0)
    claimed = outgoing(8)
    assert outbox.claim(claimed) is not None
    outbox.fail(lambda: CommError("gone"))
    outbox.release(claimed)
    assert isinstance(claimed.done.exception(), CommError)
