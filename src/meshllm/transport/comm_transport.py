"""The communicator's gRPC side: this rank's `Comm` server and its streams to every peer.

Everything here runs on one asyncio event loop per process, in a background thread named "meshllm-comm";
the blocking API in comm.py hands work to it and waits on futures. Each peer gets its own channel and one
long-lived `Exchange` stream, fed by a queue and written by one task, so messages to a peer leave in the
order they were sent and the parts of a large message are never interleaved with another message.

A peer is known to be gone when its stream to this rank breaks (the server side sees the call cancelled)
or when this rank's stream to it breaks (the client side sees the call fail); a peer that closes its
communicator ends its stream cleanly instead, which tells the two apart.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hmac
import logging
import os
import threading
from collections.abc import Callable, Coroutine
from typing import Any, ClassVar, TypeVar

import grpc
import grpc.aio

from meshllm.transport.comm_errors import CommAuthError, CommError, CommTimeoutError, PeerLostError
from meshllm.transport.comm_mailbox import Arrival, Mailbox, Payload
from meshllm.transport.proto import comm_pb2, comm_pb2_grpc
from meshllm.transport.proto import meshllm_pb2 as pb

log = logging.getLogger(__name__)

TOKEN_KEY = "x-meshllm-token"  # gRPC metadata: the cluster token, on every call when the cluster has one
RANK_KEY = "x-meshllm-rank"  # gRPC metadata on `Exchange`: the sending rank, known before its first message
PART_BYTES = 4 << 20  # larger messages travel in parts, so no tensor meets protobuf's 2 GiB message limit

_COMMON_OPTIONS = [
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
    # Pings find a peer whose machine vanished without closing its connections.
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]
CLIENT_OPTIONS = [
    *_COMMON_OPTIONS,
    # Peers start in any order: retry a refused connection quickly instead of grpc's default 1 s and up.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]
SERVER_OPTIONS = [
    *_COMMON_OPTIONS,
    ("grpc.so_reuseport", 0),  # a second server on a taken port must fail, not share it silently
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_ping_strikes", 0),
]

T = TypeVar("T")


class EventLoopThread:
    """The process's communicator event loop, running in a daemon thread; shared by every Communicator."""

    _current: ClassVar[EventLoopThread | None] = None
    _lock: ClassVar[threading.Lock] = threading.Lock()

    @classmethod
    def get(cls) -> EventLoopThread:
        with cls._lock:
            current = cls._current
            if current is None or current.pid != os.getpid() or not current.thread.is_alive():
                current = cls._current = cls()
            return current

    def __init__(self) -> None:
        self.pid = os.getpid()  # a forked child must not use its parent's (dead) loop thread
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="meshllm-comm", daemon=True)
        self.thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run `coroutine` on the loop and wait for its result (cancelled if `timeout` passes)."""
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise


def message_parts(
    source: int, channel: int, tag: int, collective: str, payload: Payload | None
) -> list[comm_pb2.CommMessage]:
    """The parts of one message: the first carries the routing and the tensor, continuations more data."""
    first = comm_pb2.CommMessage(source=source, channel=channel, tag=tag, collective=collective, parts=1)
    if payload is None:
        return [first]
    data = payload.data
    first.parts = max(1, -(-len(data) // PART_BYTES))
    head = data if first.parts == 1 else data[:PART_BYTES]
    first.tensor.CopyFrom(pb.Tensor(data=head, shape=payload.shape, dtype=payload.dtype))
    continuations = [
        comm_pb2.CommMessage(data=data[offset : offset + PART_BYTES])
        for offset in range(PART_BYTES, len(data), PART_BYTES)
    ]
    return [first, *continuations]


def _describe_rpc_error(error: BaseException) -> str:
    if isinstance(error, grpc.aio.AioRpcError):
        return f"{error.code().name}: {error.details()}"
    return f"{type(error).__name__}: {error}"


def _settle(done: concurrent.futures.Future[None], error: BaseException | None = None) -> None:
    if done.done():
        return
    if error is None:
        done.set_result(None)
    else:
        done.set_exception(error)


# One queued message: its parts, the future its sender waits on, and what it is (for error messages).
_Outgoing = tuple[list[comm_pb2.CommMessage], concurrent.futures.Future[None], str]


class _PeerLink:
    """This rank's stream to one peer, and the tasks that write to it and watch it."""

    def __init__(self, peer: int, address: str) -> None:
        self.peer = peer
        self.address = address
        self.channel: grpc.aio.Channel | None = None
        self.call: grpc.aio.StreamUnaryCall | None = None
        self.queue: asyncio.Queue[_Outgoing | None] = asyncio.Queue()
        self.sent = 0  # whole messages written; the next message's seq
        self.finished = False  # the stream was ended (closing) or broke: nothing more is written
        self.failure: str | None = None
        self.tasks: list[asyncio.Task[None]] = []


class Transport:
    """The server and the peer streams of one rank. Blocking methods are called from the caller's threads."""

    def __init__(
        self,
        rank: int,
        addresses: list[str],
        token: str | None,
        mailbox: Mailbox,
        describe_peer: Callable[[int], str],
    ) -> None:
        self.rank = rank
        self.addresses = addresses
        self.world_size = len(addresses)
        self.token = token
        self.mailbox = mailbox
        self.describe_peer = describe_peer
        self.events = EventLoopThread.get()
        self._metadata: tuple[tuple[str, str], ...] = ((TOKEN_KEY, token),) if token else ()
        self._server: grpc.aio.Server | None = None
        self._links: dict[int, _PeerLink] = {}
        self.closing = False

    # ---- the caller's side (any thread) ----

    def start(self, timeout: float) -> None:
        """Listen on this rank's address, then connect to every peer (each must answer `Hello`)."""
        self.events.run(self._start(), timeout + 5)
        self.events.run(self._connect(timeout), timeout + 5)

    def submit(self, dest: int, parts: list[comm_pb2.CommMessage], what: str) -> concurrent.futures.Future[None]:
        """Queue one message for `dest`; the future completes once gRPC took all of it."""
        done: concurrent.futures.Future[None] = concurrent.futures.Future()
        error = self.mailbox.peer_error(dest, what)
        if error is not None:
            done.set_exception(error)
            return done
        self.events.loop.call_soon_threadsafe(self._enqueue, self._links[dest], (parts, done, what))
        return done

    def close(self, timeout: float) -> None:
        """Flush every stream (bounded by `timeout`), then stop the server and close the channels."""
        try:
            self.events.run(self._close(timeout), timeout + 5)
        except Exception as error:  # closing is best effort: never let it hide the caller's own error
            log.warning("rank %d: closing the communicator: %s", self.rank, _describe_rpc_error(error))

    # ---- the loop's side ----

    async def _start(self) -> None:
        address = self.addresses[self.rank]
        server = grpc.aio.server(options=SERVER_OPTIONS)
        comm_pb2_grpc.add_CommServicer_to_server(_Servicer(self), server)
        try:
            port = server.add_insecure_port(address)
        except RuntimeError as error:
            port, reason = 0, str(error)
        else:
            reason = "bind failed"
        if port == 0:
            raise CommError(
                f"rank {self.rank} cannot listen on {address} ({reason}): is the port already in use, "
                "or is the host not an address of this machine?"
            )
        await server.start()
        self._server = server
        log.debug("rank %d listening on %s", self.rank, address)

    async def _connect(self, timeout: float) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        peers = [peer for peer in range(self.world_size) if peer != self.rank]
        tasks = [asyncio.create_task(self._open_link(peer, deadline, timeout)) for peer in peers]
        if not tasks:
            return
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in pending:
            task.cancel()
        for task in done:
            if task.exception() is not None:
                raise task.exception()  # type: ignore[misc]

    async def _open_link(self, peer: int, deadline: float, timeout: float) -> None:
        link = self._links[peer] = _PeerLink(peer, self.addresses[peer])
        link.channel = grpc.aio.insecure_channel(link.address, options=CLIENT_OPTIONS)
        stub = comm_pb2_grpc.CommStub(link.channel)
        await self._hello(stub, peer, deadline, timeout)
        link.call = stub.Exchange(metadata=(*self._metadata, (RANK_KEY, str(self.rank))))
        link.tasks = [asyncio.create_task(self._write_loop(link)), asyncio.create_task(self._watch(link))]
        log.debug("rank %d connected to %s", self.rank, self.describe_peer(peer))

    async def _hello(self, stub: comm_pb2_grpc.CommStub, peer: int, deadline: float, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        request = comm_pb2.CommHelloRequest(rank=self.rank, world_size=self.world_size)
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise CommTimeoutError(
                    f"rank {self.rank}: {self.describe_peer(peer)} did not answer within {timeout:g} s: "
                    "is that rank started, and is its address right?"
                )
            try:
                reply = await stub.Hello(request, metadata=self._metadata, timeout=remaining, wait_for_ready=True)
                break
            except grpc.aio.AioRpcError as error:
                code = error.code()
                if code == grpc.StatusCode.UNAUTHENTICATED:
                    raise CommAuthError(
                        f"rank {self.rank}: {self.describe_peer(peer)} refused this rank's cluster token "
                        f"({error.details()}); give every rank the same token"
                    ) from None
                if code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise CommError(
                        f"rank {self.rank}: {self.describe_peer(peer)} refused this rank: {_describe_rpc_error(error)}"
                    ) from None
                await asyncio.sleep(0.05)
        if reply.rank != peer or reply.world_size != self.world_size:
            raise CommError(
                f"rank {self.rank}: {self.addresses[peer]} answered as rank {reply.rank} of {reply.world_size}, "
                f"expected rank {peer} of {self.world_size}: check the address list"
            )

    def _enqueue(self, link: _PeerLink, item: _Outgoing) -> None:
        if link.finished:
            self._fail(link, item)
        else:
            link.queue.put_nowait(item)

    def _fail(self, link: _PeerLink, item: _Outgoing) -> None:
        _, done, what = item
        error = self.mailbox.peer_error(link.peer, what)
        if error is None:
            reason = link.failure or "this communicator is closing"
            error = PeerLostError(f"rank {self.rank}: {what}: {self.describe_peer(link.peer)}: {reason}", link.peer)
        _settle(done, error)

    async def _write_loop(self, link: _PeerLink) -> None:
        assert link.call is not None
        while True:
            item = await link.queue.get()
            if item is None:  # closing: end the stream after everything queued before
                link.finished = True
                try:
                    await link.call.done_writing()
                except Exception as error:
                    log.debug("rank %d: ending the stream to rank %d: %s", self.rank, link.peer, error)
                break
            if link.failure is not None:
                self._fail(link, item)
                continue
            parts, done, _ = item
            parts[0].seq = link.sent
            try:
                for part in parts:
                    await link.call.write(part)
            except Exception as error:
                self._link_failed(link, f"sending to it failed ({_describe_rpc_error(error)})")
                self._fail(link, item)
                continue
            link.sent += 1
            _settle(done)
        while not link.queue.empty():  # anything queued after the end of the stream
            item = link.queue.get_nowait()
            if item is not None:
                self._fail(link, item)

    async def _watch(self, link: _PeerLink) -> None:
        """Wait for the stream's end: the peer's summary after a clean close, or the error that broke it."""
        assert link.call is not None
        try:
            summary = await link.call
        except grpc.aio.AioRpcError as error:
            self._link_failed(link, f"its server dropped this rank's stream ({_describe_rpc_error(error)})")
            return
        if summary.messages != link.sent:
            log.warning(
                "rank %d: rank %d received %d of the %d messages sent to it",
                self.rank,
                link.peer,
                summary.messages,
                link.sent,
            )

    def _link_failed(self, link: _PeerLink, reason: str) -> None:
        if link.failure is None:
            link.failure = reason
        if not self.closing and self.mailbox.mark_lost(link.peer, reason):
            log.warning("rank %d: %s is gone: %s", self.rank, self.describe_peer(link.peer), reason)

    async def _close(self, timeout: float) -> None:
        self.closing = True
        links = list(self._links.values())
        for link in links:
            link.queue.put_nowait(None)
        tasks = [task for link in links for task in link.tasks]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout)
            for task in pending:
                task.cancel()
        if self._server is not None:
            await self._server.stop(grace=None)
        for link in links:
            if link.channel is not None:
                await link.channel.close()


class _Servicer(comm_pb2_grpc.CommServicer):
    """The `Comm` service of one rank: answers `Hello` and puts arriving messages in the mailbox."""

    def __init__(self, transport: Transport) -> None:
        self.transport = transport

    async def _authorize(self, context: grpc.aio.ServicerContext) -> None:
        token = self.transport.token
        if token is None:
            return
        presented = dict(context.invocation_metadata() or ()).get(TOKEN_KEY)
        if presented is None or not hmac.compare_digest(str(presented).encode(), token.encode()):
            problem = "no cluster token" if presented is None else "a wrong cluster token"
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                f"rank {self.transport.rank}: the call carried {problem} ({TOKEN_KEY} metadata)",
            )

    async def Hello(
        self, request: comm_pb2.CommHelloRequest, context: grpc.aio.ServicerContext
    ) -> comm_pb2.CommHelloReply:
        await self._authorize(context)
        rank, world_size = self.transport.rank, self.transport.world_size
        if request.world_size != world_size:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"rank {rank} is one of {world_size} ranks, the caller (rank {request.rank}) "
                f"one of {request.world_size}",
            )
        if not 0 <= request.rank < world_size or request.rank == rank:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"rank {request.rank} is not a peer of rank {rank}"
            )
        return comm_pb2.CommHelloReply(rank=rank, world_size=world_size)

    async def Exchange(
        self, request_iterator: Any, context: grpc.aio.ServicerContext
    ) -> comm_pb2.CommStreamSummary:
        await self._authorize(context)
        transport = self.transport
        source_text = dict(context.invocation_metadata() or ()).get(RANK_KEY, "")
        if not str(source_text).isdigit() or not 0 <= int(source_text) < transport.world_size:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"no valid {RANK_KEY} metadata")
        source = int(source_text)
        received = 0  # whole messages
        first: comm_pb2.CommMessage | None = None  # the first part of a message still coming in parts
        chunks: list[bytes] = []
        clean = False
        try:
            async for part in request_iterator:
                if first is None:
                    if part.seq != received or part.source != source:
                        reason = (
                            f"protocol error: expected message {received} from rank {source}, "
                            f"got message {part.seq} from rank {part.source}"
                        )
                        await context.abort(grpc.StatusCode.DATA_LOSS, reason)
                    received += 1
                    data = part.tensor.data if part.HasField("tensor") else None
                    if part.parts > 1:
                        first, chunks = part, [data or b""]
                    else:
                        self._deliver(part, data)
                else:
                    chunks.append(part.data)
                    if len(chunks) == first.parts:
                        self._deliver(first, b"".join(chunks))
                        first, chunks = None, []
            clean = first is None
        finally:
            if clean:
                transport.mailbox.mark_closed(source)
            elif not transport.closing and transport.mailbox.mark_lost(
                source, "its connection to this rank broke (the process died or the network failed)"
            ):
                log.warning("rank %d: %s is gone", transport.rank, transport.describe_peer(source))
        return comm_pb2.CommStreamSummary(messages=received)

    def _deliver(self, first: comm_pb2.CommMessage, data: bytes | None) -> None:
        payload = None
        if data is not None:
            payload = Payload(data, tuple(first.tensor.shape), first.tensor.dtype)
        key = (first.channel, first.source, first.tag)
        self.transport.mailbox.put(key, Arrival(first.source, first.collective, payload))
