"""Where messages wait for their receive, and what this rank knows about its peers.

The threads reading the peers' links and streams (incoming.py) put whole messages in; the caller's threads
take them out, blocking until the message is there, its sender is known to be gone, or the timeout
passes. Messages are kept per (channel, source, tag) in arrival order, so a receive always gets the
oldest message of its key.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from meshllm.transport.comm.errors import CommError, CommTimeoutError, PeerLostError
from meshllm.transport.comm.wire import Payload

POINT_TO_POINT = 0  # CommChannel values (comm.proto)
COLLECTIVE = 1


@dataclass(frozen=True)
class Arrival:
    """One whole message that arrived from `source`; `payload` is None for messages without data."""

    source: int
    collective: str
    payload: Payload | None


MailboxKey = tuple[int, int, int]  # (channel, source, tag)


class Mailbox:
    def __init__(self, rank: int, describe_peer: Callable[[int], str]) -> None:
        self.rank = rank
        self._describe_peer = describe_peer  # rank -> "rank 2 (10.0.0.3:50100)"
        self._condition = threading.Condition()
        self._queues: dict[MailboxKey, deque[Arrival]] = {}
        self._lost: dict[int, str] = {}  # peer rank -> why it is gone
        self._closed_peers: set[int] = set()  # peers that closed their stream to us cleanly
        self._closed = False  # this rank's communicator was closed

    def put(self, key: MailboxKey, arrival: Arrival) -> None:
        with self._condition:
            self._queues.setdefault(key, deque()).append(arrival)
            self._condition.notify_all()

    def mark_lost(self, peer: int, reason: str) -> bool:
        """Record that `peer` is gone; wakes every waiting receive. True the first time."""
        with self._condition:
            if peer in self._lost or peer in self._closed_peers:
                return False
            self._lost[peer] = reason
            self._condition.notify_all()
            return True

    def mark_closed(self, peer: int) -> None:
        """`peer` closed its communicator: what it sent is all here, nothing more will come."""
        with self._condition:
            if peer not in self._lost:
                self._closed_peers.add(peer)
            self._condition.notify_all()

    def close(self) -> None:
        with self._condition:
            self._closed = True
            self._condition.notify_all()

    def has_closed(self, peer: int) -> bool:
        with self._condition:
            return peer in self._closed_peers

    def peer_error(self, peer: int, what: str) -> CommError | None:
        """The error a new operation on `peer` must raise right away, or None when the peer is usable."""
        with self._condition:
            return self._peer_error_locked(peer, what, any_lost_fails=False)

    def take(self, key: MailboxKey, timeout: float, what: str, any_lost_fails: bool = False) -> Arrival:
        """The oldest message of `key`, waiting up to `timeout` seconds for it.

        `what` describes the operation for error messages ("recv from rank 2 with tag 7"). With
        `any_lost_fails` (collectives) the loss of any peer ends the wait, not just the loss of the sender:
        a collective cannot complete once one of its members is gone.
        """
        deadline = time.monotonic() + timeout
        source = key[1]
        with self._condition:
            while True:
                queue = self._queues.get(key)
                if queue:
                    arrival = queue.popleft()
                    if not queue:
                        del self._queues[key]
                    return arrival
                error = self._peer_error_locked(source, what, any_lost_fails)
                if error is not None:
                    raise error
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise CommTimeoutError(
                        f"rank {self.rank}: {what}: nothing arrived from {self._describe_peer(source)} "
                        f"within {timeout:g} s (it is connected, but has not sent it)"
                    )
                self._condition.wait(remaining)

    def _peer_error_locked(self, peer: int, what: str, any_lost_fails: bool) -> CommError | None:
        if self._closed:
            return CommError(f"rank {self.rank}: {what}: this communicator is closed")
        lost = peer if peer in self._lost else None
        if lost is None and any_lost_fails and self._lost:
            lost = min(self._lost)
        if lost is not None:
            return PeerLostError(
                f"rank {self.rank}: {what}: {self._describe_peer(lost)} is gone: {self._lost[lost]}", lost
            )
        if peer in self._closed_peers:
            return CommError(
                f"rank {self.rank}: {what}: {self._describe_peer(peer)} closed its communicator "
                "and will send nothing more"
            )
        return None
