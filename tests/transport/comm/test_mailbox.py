"""mailbox.py: messages wait for their receive in order; a lost or closed peer ends the wait at once."""

from __future__ import annotations

import threading
import time

import pytest

from meshllm.transport.comm.errors import CommError, CommTimeoutError, PeerLostError
from meshllm.transport.comm.mailbox import COLLECTIVE, POINT_TO_POINT, Arrival, Mailbox
from meshllm.transport.comm.wire import Payload


def mailbox() -> Mailbox:
    return Mailbox(0, lambda peer: f"rank {peer} (127.0.0.1:{50200 + peer})")


def arrival(source: int, value: int) -> Arrival:
    return Arrival(source, "", Payload(bytes([value]), (1,), "int32"))


def test_messages_of_one_key_are_taken_oldest_first_and_keys_do_not_mix() -> None:
    box = mailbox()
    box.put((POINT_TO_POINT, 1, 7), arrival(1, 1))
    box.put((COLLECTIVE, 1, 7), arrival(1, 2))
    box.put((POINT_TO_POINT, 1, 7), arrival(1, 3))

    taken = [box.take((POINT_TO_POINT, 1, 7), 1.0, "recv").payload for _ in range(2)]

    assert [payload.data for payload in taken if payload] == [bytes([1]), bytes([3])]
    assert box.take((COLLECTIVE, 1, 7), 1.0, "barrier").payload == arrival(1, 2).payload


def test_a_take_that_times_out_names_the_peer_and_the_operation() -> None:
    with pytest.raises(CommTimeoutError, match=r"rank 0: recv with tag 7: nothing arrived from rank 1 \("):
        mailbox().take((POINT_TO_POINT, 1, 7), 0.05, "recv with tag 7")


def test_a_lost_peer_wakes_a_waiting_take() -> None:
    box = mailbox()
    threading.Timer(0.1, lambda: box.mark_lost(1, "its stream broke")).start()
    started = time.monotonic()

    with pytest.raises(PeerLostError, match="rank 1 .* is gone: its stream broke") as lost:
        box.take((POINT_TO_POINT, 1, 0), 10.0, "recv")

    assert lost.value.peer == 1 and time.monotonic() - started < 5


def test_any_lost_peer_fails_a_collective_but_not_a_receive_from_another() -> None:
    box = mailbox()
    box.mark_lost(2, "gone")

    with pytest.raises(PeerLostError, match="rank 2"):
        box.take((COLLECTIVE, 1, 0), 1.0, "barrier #0", any_lost_fails=True)
    with pytest.raises(CommTimeoutError):
        box.take((POINT_TO_POINT, 1, 0), 0.05, "recv")


def test_a_closed_peer_is_not_lost_and_what_it_sent_is_still_taken() -> None:
    box = mailbox()
    box.put((POINT_TO_POINT, 1, 0), arrival(1, 5))
    box.mark_closed(1)

    assert not box.mark_lost(1, "late")  # a peer that closed cleanly is not lost afterwards
    assert box.take((POINT_TO_POINT, 1, 0), 1.0, "recv").payload == arrival(1, 5).payload
    with pytest.raises(CommError, match="closed its communicator") as closed:
        box.take((POINT_TO_POINT, 1, 0), 1.0, "recv")
    assert type(closed.value) is CommError
