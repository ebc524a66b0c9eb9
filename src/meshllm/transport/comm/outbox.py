"""The queue of messages for one peer, taken part by part by whatever carries them.

A sending thread (gRPC's, for an `Exchange` stream; the link's own, for a framed link) calls
`Outbox.__next__` for one part at a time, and only once the part before was written; so when it asks for
the part after a message's last part, that message has left, and its future completes. Parts are
encoded here, on that thread, each as it is needed (wire.py): a large message is never copied whole.
When the stream ends, its last part is a goodbye. On a framed link a small message sent while nothing
is queued skips the thread: its sender `claim`s it and writes it itself.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from meshllm.transport.comm.errors import CommError
from meshllm.transport.comm.wire import GOODBYE, Payload, encode_continuation, encode_first_part

PART_BYTES = 1 << 20  # larger messages travel in parts: faster through gRPC, and never near protobuf's 2 GiB
OUTBOX_BYTES = 256 << 20  # a send waits while this much is already queued for its peer


def settle(done: concurrent.futures.Future[None], error: BaseException | None = None) -> None:
    if done.done():
        return
    if error is None:
        done.set_result(None)
    else:
        done.set_exception(error)


@dataclass
class OutgoingMessage:
    """One message waiting in an outbox, and the future its sender may wait on."""

    channel: int
    tag: int
    collective: str
    payload: Payload | None
    done: concurrent.futures.Future[None]

    @property
    def size(self) -> int:
        return 0 if self.payload is None else len(self.payload.data)


class Outbox:
    """The messages waiting to go to one peer, in order: the request iterator of the stream to that peer.

    The sending thread calls `__next__` for one part at a time, and only once the part before was
    written; so when it asks for the part after a message's last part, that message has left. Parts are
    encoded here, on that thread, each as it is needed: a large message is never copied whole.
    """

    def __init__(self, source: int, limit: int = OUTBOX_BYTES) -> None:
        self._source = source
        self._limit = limit
        self._condition = threading.Condition()
        self._queue: deque[OutgoingMessage] = deque()
        self._queued_bytes = 0
        self._current: OutgoingMessage | None = None  # the message whose parts are being taken
        self._offset = 0  # bytes of the current message's data already in parts
        self._written: OutgoingMessage | None = None  # complete once gRPC asks for the next part
        self._claimed: OutgoingMessage | None = None  # a caller writes it itself (`claim`); the thread waits
        self.messages = 0  # messages started; the seq of the next one
        self._ending = False  # no more messages: the stream ends once the queue is empty
        self._said_goodbye = False
        self._failure: Callable[[], BaseException] | None = None

    def put(self, message: OutgoingMessage, timeout: float) -> bool:
        """Queue `message`; False if it did not fit within `timeout` (the peer does not read)."""
        deadline = time.monotonic() + timeout
        with self._condition:
            while (
                self._queued_bytes and self._queued_bytes + message.size > self._limit and not self._failure
            ):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._condition.wait(remaining)
            if self._failure is not None or self._ending:
                failure = self._failure or (lambda: CommError("the stream to this peer is closing"))
                settle(message.done, failure())
                return True
            self._queue.append(message)
            self._queued_bytes += message.size
            self._condition.notify_all()
        return True

    def claim(self, message: OutgoingMessage) -> bytes | None:
        """`message` as its one part, numbered next, for the caller to write itself and then `release`,
        when it fits in one part and nothing is queued or being written; else None (`put` it)."""
        if message.size > PART_BYTES:
            return None
        with self._condition:
            writing = (self._current, self._written, self._claimed)
            busy = bool(self._queue) or any(taken is not None for taken in writing)
            if busy or self._ending or self._failure is not None:
                return None
            self._claimed = message  # `fail` settles it, as any message being written
            seq, self.messages = self.messages, self.messages + 1
        return self._first_part(message, seq, message.size)

    def release(self, message: OutgoingMessage) -> None:
        """The claimed `message` was written (or failed, then `fail` settled it): the thread may go on."""
        with self._condition:
            written = self._claimed is message  # else `fail` took it
            if written:
                self._claimed = None
            self._condition.notify_all()
        if written:
            settle(message.done)

    def end(self) -> None:
        """End the stream after everything queued so far."""
        with self._condition:
            self._ending = True
            self._condition.notify_all()

    def fail(self, failure: Callable[[], BaseException]) -> None:
        """The stream broke: fail every message not yet written, and every later one, with `failure()`."""
        with self._condition:
            self._failure = failure
            unsent = [self._written, self._current, self._claimed, *self._queue]
            self._queue.clear()
            self._queued_bytes = 0
            self._written = self._current = self._claimed = None
            self._condition.notify_all()
        for message in unsent:
            if message is not None:
                settle(message.done, failure())

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        with self._condition:
            written, self._written = self._written, None
        if written is not None:  # gRPC asks for a part only once the previous one was written
            settle(written.done)
        seq: int | None = None  # set when this part starts a message
        with self._condition:
            if self._current is None:
                while (self._claimed is not None or not (self._queue or self._ending)) and not self._failure:
                    self._condition.wait()
                if self._failure is not None or (not self._queue and self._said_goodbye):
                    raise StopIteration
                if not self._queue:  # ending: say goodbye, so the peer can tell a close from a death
                    self._said_goodbye = True
                    return GOODBYE
                self._current, self._offset = self._queue.popleft(), 0
                self._queued_bytes -= self._current.size
                seq, self.messages = self.messages, self.messages + 1
                self._condition.notify_all()
            message = self._current
        if seq is not None:
            head = min(message.size, PART_BYTES)
            part = self._first_part(message, seq, head)
            self._offset = head
        else:
            assert message.payload is not None
            data = memoryview(message.payload.data)[self._offset : self._offset + PART_BYTES]
            part = encode_continuation(data)
            self._offset += len(data)
        if self._offset >= message.size:
            with self._condition:
                if self._current is message:  # not failed meanwhile
                    self._current, self._written = None, message
        return part

    def _first_part(self, message: OutgoingMessage, seq: int, head: int) -> bytes:
        parts = max(1, -(-message.size // PART_BYTES))
        return encode_first_part(
            self._source, message.channel, message.tag, seq, message.collective, parts, message.payload, head
        )
