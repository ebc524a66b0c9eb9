"""The collective algorithms, written on top of point-to-point messages.

Each function runs one collective call on one rank. `CollectiveCall` gives it the messages of that call
only: every rank numbers its collectives in the order it calls them, and a message travels with that
number, so the messages of one collective never meet those of another (nor the user's own).

- barrier: dissemination, ceil(log2 N) rounds; in round k rank r signals r + 2^k and waits for r - 2^k.
- broadcast: binomial tree from the root, ceil(log2 N) rounds; the payload is forwarded as it arrived.
- all_reduce, small arrays: every rank sends its array to every other and reduces all N in rank order,
  so every rank computes the bit-identical result in one round.
- all_reduce, large arrays: ring. The flat array is cut into N segments; in N - 1 reduce-scatter steps
  each rank passes a partial sum to its right neighbour and adds the one from its left, until rank r holds
  the full result of segment r + 1; N - 1 all-gather steps then pass the finished segments around. Each
  rank sends 2 (N - 1) / N of the array in all, whatever N is.
"""

from __future__ import annotations

import concurrent.futures
from typing import Protocol

import numpy as np

from meshllm.transport.comm.errors import CommError
from meshllm.transport.comm.reduce import accumulate, finish, narrow, widen
from meshllm.transport.comm.wire import Payload
from meshllm.transport.tensors import numpy_dtype

# Payloads up to this size are copied before they are queued; larger ones are sent from where they are,
# and the collective waits until they were written before it returns (the caller may then reuse them).
COPY_BYTES = 64 << 10


class CollectiveCall(Protocol):
    """The point-to-point operations of one collective call, as one rank sees them."""

    rank: int
    world_size: int
    name: str
    seq: int

    def post(self, dest: int, payload: Payload | None) -> concurrent.futures.Future[None]:
        """Queue this call's next message for `dest` (raises at once if `dest` is known to be gone)."""
        ...

    def take(self, source: int) -> Payload | None:
        """This call's next message from `source`, waiting for it."""
        ...

    def wait(self, sends: list[concurrent.futures.Future[None]]) -> None:
        """Wait until every message of `sends` was written."""
        ...


def barrier(call: CollectiveCall) -> None:
    rank, world_size = call.rank, call.world_size
    distance = 1
    while distance < world_size:
        call.post((rank + distance) % world_size, None)
        call.take((rank - distance) % world_size)
        distance *= 2


def broadcast(call: CollectiveCall, root: int, payload: Payload | None) -> Payload:
    """The root's payload, on every rank. `payload` is the root's array (a view of it), None elsewhere."""
    rank, world_size = call.rank, call.world_size
    relative = (rank - root) % world_size  # the root is 0 in the tree
    mask = 1
    while mask < world_size:  # receive from the parent: the rank that differs in the lowest set bit
        if relative & mask:
            payload = _expect(call, (rank - mask) % world_size)
            break
        mask <<= 1
    assert payload is not None
    large = len(payload.data) > COPY_BYTES
    outgoing = payload if large else payload.snapshot()
    sends = []
    mask >>= 1
    while mask > 0:  # then pass it on to the children, farthest subtree first
        if relative + mask < world_size:
            sends.append(call.post((rank + mask) % world_size, outgoing))
        mask >>= 1
    if large:
        call.wait(sends)
    return payload


def all_reduce(call: CollectiveCall, payload: Payload, op: str, ring_threshold: int) -> Payload:
    """The elementwise reduction of every rank's payload (same shape and dtype on every rank).

    Direct while each rank would send at most `ring_threshold` bytes that way (its array to N - 1 peers),
    else the ring.

    `payload` may be a view of the caller's array: it is read, never written, and not kept.
    """
    world_size = call.world_size
    if world_size == 1:
        return payload.snapshot()
    elements = int(np.prod(payload.shape, dtype=np.int64))
    if len(payload.data) * (world_size - 1) <= ring_threshold or elements < world_size:
        return _all_reduce_direct(call, payload, op)
    return _all_reduce_ring(call, payload, op, elements)


def _all_reduce_direct(call: CollectiveCall, payload: Payload, op: str) -> Payload:
    rank, world_size = call.rank, call.world_size
    outgoing = payload.snapshot()  # small: a copy is cheaper than waiting for the sends
    for peer in range(world_size):
        if peer != rank:
            call.post(peer, outgoing)
    total: np.ndarray | None = None
    for source in range(world_size):  # rank order: the same sum, bit for bit, on every rank
        contribution = payload if source == rank else _expect(call, source)
        if contribution.shape != payload.shape or contribution.dtype != payload.dtype:
            raise _mismatch(call, source, f"{contribution.dtype} {list(contribution.shape)}", payload)
        if total is None:
            total = widen(contribution, copy=True)
        else:
            accumulate(total, widen(contribution), op)
    assert total is not None
    finish(total, op, world_size)
    return _payload_over(narrow(total, payload.dtype), payload.shape, payload.dtype)


def _all_reduce_ring(call: CollectiveCall, payload: Payload, op: str, elements: int) -> Payload:
    rank, world_size = call.rank, call.world_size
    right, left = (rank + 1) % world_size, (rank - 1) % world_size
    bounds = [elements * index // world_size for index in range(world_size + 1)]
    segments = [slice(bounds[index], bounds[index + 1]) for index in range(world_size)]
    values = widen(payload, copy=True)  # [elements] in the working dtype, this rank's own copy
    working_dtype = values.dtype.name

    # Reduce-scatter. Segments go out as views of `values`: a segment sent at one step is never written
    # again, so it can leave whenever its link gets to it.
    for step in range(world_size - 1):
        outgoing, incoming = segments[(rank - step) % world_size], segments[(rank - step - 1) % world_size]
        call.post(right, _segment_payload(values, outgoing, working_dtype))
        partial = _expect_segment(call, left, incoming, working_dtype, payload)
        accumulate(values[incoming], partial, op)

    owned = segments[(rank + 1) % world_size]  # this rank now holds the full reduction of this segment
    finish(values[owned], op, world_size)
    result = np.empty(elements, dtype=numpy_dtype(payload.dtype))
    result[owned] = narrow(values[owned], payload.dtype)
    del values

    # All-gather, into `result`, which becomes the caller's: wait for its sends before handing it over.
    sends = []
    for step in range(world_size - 1):
        outgoing, incoming = segments[(rank + 1 - step) % world_size], segments[(rank - step) % world_size]
        sends.append(call.post(right, _segment_payload(result, outgoing, payload.dtype)))
        result[incoming] = _expect_segment(call, left, incoming, payload.dtype, payload)
    call.wait(sends)
    return _payload_over(result, payload.shape, payload.dtype)


def _payload_over(values: np.ndarray, shape: tuple[int, ...], dtype: str) -> Payload:
    """A payload over `values` (already in `dtype`'s wire layout), without a copy."""
    return Payload(np.ascontiguousarray(values).data.cast("B"), shape, dtype)


def _segment_payload(values: np.ndarray, segment: slice, dtype: str) -> Payload:
    return _payload_over(values[segment], (segment.stop - segment.start,), dtype)


def _expect(call: CollectiveCall, source: int) -> Payload:
    payload = call.take(source)
    if payload is None:
        raise CommError(
            f"rank {call.rank}: {call.name} #{call.seq}: rank {source} sent a message without data"
        )
    return payload


def _expect_segment(
    call: CollectiveCall, source: int, segment: slice, dtype: str, mine: Payload
) -> np.ndarray:
    """A ring segment from `source`: it must have this rank's length and dtype for that segment."""
    payload = _expect(call, source)
    if payload.dtype != dtype or payload.shape != (segment.stop - segment.start,):
        raise _mismatch(call, source, f"a {payload.dtype} segment of {list(payload.shape)}", mine)
    return np.frombuffer(payload.data, dtype=numpy_dtype(dtype))


def _mismatch(call: CollectiveCall, source: int, theirs: str, mine: Payload) -> CommError:
    return CommError(
        f"rank {call.rank}: {call.name} #{call.seq}: rank {source} sent {theirs}, while this rank has "
        f"{mine.dtype} {list(mine.shape)}: every rank must pass the same shape and dtype"
    )
