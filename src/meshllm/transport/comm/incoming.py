"""The reading of one peer's stream of parts, whichever transport carries it.

A gRPC `Exchange` stream (server.py) and a framed link (framed.py) both hand each part they receive to
an `IncomingStream`: it checks the message numbers, joins the parts of a large message into one buffer as
they arrive, puts every whole message in the mailbox, and notes the goodbye that ends a clean close.
"""

from __future__ import annotations

import numpy as np

from meshllm.transport.comm.mailbox import Arrival, Mailbox
from meshllm.transport.comm.wire import Part, Payload, parse_part
from meshllm.transport.tensors import numpy_dtype


class StreamError(Exception):
    """The stream broke its own rules (a gap in the message numbers, a part that does not fit): the
    transport ends it, and the peer counts as gone."""


class _Assembly:
    """A message arriving in parts, copied into one buffer as the parts come (each is freed at once)."""

    def __init__(self, first: Part) -> None:
        itemsize = numpy_dtype(first.dtype).itemsize
        self.buffer = np.empty(int(np.prod(first.shape, dtype=np.int64)) * itemsize, dtype=np.uint8)
        self.filled = 0
        self.parts = 0
        self.add(first.data)

    def add(self, data: memoryview | None) -> bool:
        """Append one part's data; False if it does not fit."""
        size = 0 if data is None else len(data)
        if self.filled + size > len(self.buffer):
            return False
        if data is not None and size:
            self.buffer[self.filled : self.filled + size] = np.frombuffer(data, dtype=np.uint8)
        self.filled += size
        self.parts += 1
        return True

    @property
    def complete(self) -> bool:
        return self.filled == len(self.buffer)


class IncomingStream:
    """The parts one peer (`source`) sends this rank, in order, fed one at a time by one thread."""

    def __init__(self, source: int, mailbox: Mailbox) -> None:
        self.source = source
        self.mailbox = mailbox
        self.received = 0  # whole messages started; the seq the next one must carry
        self.said_goodbye = False
        self._first: Part | None = None  # the first part of a message still coming in parts
        self._assembly: _Assembly | None = None

    @property
    def clean(self) -> bool:
        """Whether the stream may end here as a clean close: after a goodbye, no message cut short."""
        return self.said_goodbye and self._first is None

    def feed(self, raw: bytes | memoryview) -> None:
        """One encoded part (wire.py). StreamError when it breaks the stream's rules."""
        try:
            part = parse_part(raw)
        except (ValueError, IndexError, UnicodeDecodeError) as error:
            raise StreamError(f"a part that is not a CommMessage ({error})") from None
        first, assembly = self._first, self._assembly
        if first is None and part.goodbye:
            self.said_goodbye = True
        elif first is None:
            if part.seq != self.received or part.source != self.source:
                raise StreamError(
                    f"expected message {self.received} from rank {self.source}, "
                    f"got message {part.seq} from rank {part.source}"
                )
            self.received += 1
            if part.parts > 1:
                self._first, self._assembly = part, _Assembly(part)
            else:
                self._deliver(part, part.data)
        else:
            assert assembly is not None
            if not assembly.add(part.data):
                raise StreamError(f"message {self.received - 1}: more data than its tensor holds")
            if assembly.parts == first.parts:
                if not assembly.complete:
                    raise StreamError(f"message {self.received - 1}: less data than its tensor holds")
                self._deliver(first, assembly.buffer)
                self._first = self._assembly = None

    def _deliver(self, first: Part, data: memoryview | np.ndarray | None) -> None:
        payload = Payload(data, first.shape, first.dtype) if first.has_tensor and data is not None else None
        key = (first.channel, first.source, first.tag)
        self.mailbox.put(key, Arrival(first.source, first.collective, payload))
