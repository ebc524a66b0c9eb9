"""The communicator's links: this rank's `Comm` server and its gRPC streams to every peer.

Each peer gets its own channel and one long-lived `Exchange` stream. Messages for a peer go into its
`Outbox` (outbox.py), the stream's request iterator, from which gRPC's sending thread takes them one
part at a time, in order. The server (server.py) reads the streams peers keep open to this rank and
puts whole messages in the mailbox.

The blocking (thread-based) gRPC API is used on purpose: the communicator's own API is blocking, and
here a bare round trip costs ~0.4 ms through gRPC's threads against ~0.75 ms with grpc.aio on an event
loop in a background thread (every message then crosses two more thread hand-offs).

A peer is known to be gone when its stream to this rank ends without a goodbye (the server sees the
call cancelled or cut) or when this rank's stream to it breaks (the client sees the call fail). A peer
that closes its communicator sends a goodbye as the last part of its stream; the other ranks then end
their streams to it as well, so its server stops without cancelling anything.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable

import grpc

from meshllm.transport.comm.errors import CommAuthError, CommError, CommTimeoutError, PeerLostError
from meshllm.transport.comm.mailbox import Mailbox
from meshllm.transport.comm.outbox import Outbox, OutgoingMessage
from meshllm.transport.comm.server import CommServicer
from meshllm.transport.comm.wire import RANK_KEY, SERVICE, Payload
from meshllm.transport.proto import comm_pb2, comm_pb2_grpc
from meshllm.transport.rpc import handshake_problem, token_metadata
from meshllm.transport.tls import TlsFiles, add_port, blocking_channel

log = logging.getLogger(__name__)

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


def describe_rpc_error(error: BaseException) -> str:
    if isinstance(error, grpc.RpcError) and hasattr(error, "code"):
        return f"{error.code().name}: {error.details()}"
    return f"{type(error).__name__}: {error}"


class Links:
    """The server and the peer streams of one rank; every method may be called from any thread."""

    def __init__(
        self,
        rank: int,
        addresses: list[str],
        token: str | None,
        mailbox: Mailbox,
        describe_peer: Callable[[int], str],
        tls: TlsFiles | None = None,
    ) -> None:
        self.rank = rank
        self.tls = tls
        self.addresses = addresses
        self.world_size = len(addresses)
        self.token = token
        self.mailbox = mailbox
        self.describe_peer = describe_peer
        self.closing = False
        self._metadata = token_metadata(token)
        self._server: grpc.Server | None = None
        self._workers: concurrent.futures.ThreadPoolExecutor | None = None
        self._channels: dict[int, grpc.Channel] = {}
        self._outboxes: dict[int, Outbox] = {}
        self._streams: dict[int, grpc.Future] = {}
        self._incoming = threading.Condition()  # guards _open_incoming
        self._open_incoming: set[int] = set()  # peers whose stream to this rank is open

    def start(self, timeout: float) -> None:
        """Listen on this rank's address, then connect to every peer (each must answer `Hello`)."""
        address = self.addresses[self.rank]
        # One thread per incoming stream, plus a few for Hello calls while peers connect.
        workers = self._workers = concurrent.futures.ThreadPoolExecutor(
            self.world_size + 4, f"meshllm-comm-{self.rank}"
        )
        server = grpc.server(workers, options=SERVER_OPTIONS)
        server.add_generic_rpc_handlers((CommServicer(self).handler(),))
        try:
            add_port(server, address, self.tls)
        except OSError as error:
            raise CommError(
                f"rank {self.rank} cannot listen on {address} ({error}): is the port already in use, "
                "or is the host not an address of this machine?"
            ) from None
        server.start()
        self._server = server
        deadline = time.monotonic() + timeout
        for peer in range(self.world_size):
            if peer != self.rank:
                self._connect(peer, deadline, timeout)

    def _connect(self, peer: int, deadline: float, timeout: float) -> None:
        channel = self._channels[peer] = blocking_channel(self.addresses[peer], self.tls, CLIENT_OPTIONS)
        stub = comm_pb2_grpc.CommStub(channel)
        self._hello(stub, peer, deadline, timeout)
        outbox = self._outboxes[peer] = Outbox(self.rank)
        metadata = (*self._metadata, (RANK_KEY, str(self.rank)))
        # Parts are bytes already (wire.py), so no serializer: gRPC sends them as they are.
        exchange = channel.stream_unary(
            f"/{SERVICE}/Exchange",
            request_serializer=None,
            response_deserializer=comm_pb2.CommStreamSummary.FromString,
        )
        stream = self._streams[peer] = exchange.future(outbox, metadata=metadata)
        stream.add_done_callback(lambda call: self._stream_ended(peer, call))
        log.debug("rank %d connected to %s", self.rank, self.describe_peer(peer))

    def _hello(self, stub: comm_pb2_grpc.CommStub, peer: int, deadline: float, timeout: float) -> None:
        request = comm_pb2.CommHelloRequest(rank=self.rank, world_size=self.world_size)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._raise_if_handshake_fails(stub, peer, request)
                raise CommTimeoutError(
                    f"rank {self.rank}: {self.describe_peer(peer)} did not answer within {timeout:g} s: "
                    "is that rank started, and is its address right?"
                )
            try:
                reply = stub.Hello(request, metadata=self._metadata, timeout=remaining, wait_for_ready=True)
                break
            except grpc.RpcError as error:
                code = error.code()  # type: ignore[attr-defined]
                if code == grpc.StatusCode.UNAUTHENTICATED:
                    raise CommAuthError(
                        f"rank {self.rank}: {self.describe_peer(peer)} refused this rank's cluster token "
                        f"({error.details()}); give every rank the same token"  # type: ignore[attr-defined]
                    ) from None
                if code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise CommError(
                        f"rank {self.rank}: {self.describe_peer(peer)} refused this rank: {describe_rpc_error(error)}"
                    ) from None
                time.sleep(0.05)
        if reply.rank != peer or reply.world_size != self.world_size:
            raise CommError(
                f"rank {self.rank}: {self.addresses[peer]} answered as rank {reply.rank} of {reply.world_size}, "
                f"expected rank {peer} of {self.world_size}: check the address list"
            )

    def _raise_if_handshake_fails(
        self, stub: comm_pb2_grpc.CommStub, peer: int, request: comm_pb2.CommHelloRequest
    ) -> None:
        """After waiting in vain: one call that fails fast tells whether the TLS handshake is the reason."""
        try:
            stub.Hello(request, metadata=self._metadata, timeout=2.0)
        except grpc.RpcError as error:
            details = error.details() or ""  # type: ignore[attr-defined]
            problem = handshake_problem(details, secure=self.tls is not None)
            if problem:
                raise CommAuthError(f"rank {self.rank}: {self.describe_peer(peer)} {problem}") from None

    def submit(
        self,
        dest: int,
        channel: int,
        tag: int,
        collective: str,
        payload: Payload | None,
        what: str,
        timeout: float,
    ) -> concurrent.futures.Future[None]:
        """Queue one message for `dest` and return; the future completes once gRPC wrote all of it."""
        done: concurrent.futures.Future[None] = concurrent.futures.Future()
        error = self.mailbox.peer_error(dest, what)
        if error is not None:
            done.set_exception(error)
        elif not self._outboxes[dest].put(OutgoingMessage(channel, tag, collective, payload, done), timeout):
            done.set_exception(
                CommTimeoutError(
                    f"rank {self.rank}: {what}: {self.describe_peer(dest)} has not taken what was sent "
                    f"to it before within {timeout:g} s (it does not read, or the network is stuck)"
                )
            )
        return done

    def _stream_ended(self, peer: int, call: grpc.Future) -> None:
        """gRPC's callback when this rank's stream to `peer` ended: cleanly after `close`, or broken."""
        error = call.exception() if not call.cancelled() else None
        outbox = self._outboxes[peer]
        if error is None and not call.cancelled():
            summary = call.result()
            if summary.messages != outbox.messages:
                log.warning(
                    "rank %d: rank %d took %d of %d messages",
                    self.rank,
                    peer,
                    summary.messages,
                    outbox.messages,
                )
            outbox.fail(lambda: CommError(f"rank {self.rank}: the stream to rank {peer} is closed"))
            return
        detail = describe_rpc_error(error) if error else "cancelled"
        reason = f"the stream to it broke ({detail}): the process died, or the network failed"
        if not self.closing and self.mailbox.mark_lost(peer, reason):
            log.warning("rank %d: %s is gone: %s", self.rank, self.describe_peer(peer), reason)

        def failure() -> BaseException:
            return self.mailbox.peer_error(peer, "send") or PeerLostError(
                f"rank {self.rank}: send: {self.describe_peer(peer)}: {reason}", peer
            )

        outbox.fail(failure)

    def close(self, timeout: float) -> None:
        """End every stream after what was queued (waiting up to `timeout`), then stop the server."""
        self.closing = True
        for outbox in self._outboxes.values():
            outbox.end()
        deadline = time.monotonic() + timeout
        for peer, stream in self._streams.items():
            try:
                stream.result(max(0.0, deadline - time.monotonic()))
            except grpc.FutureTimeoutError:
                log.warning(
                    "rank %d: %s did not take the end of its stream", self.rank, self.describe_peer(peer)
                )
                stream.cancel()
            except Exception as error:
                log.debug(
                    "rank %d: the stream to rank %d ended: %s", self.rank, peer, describe_rpc_error(error)
                )
        # Each peer answers the end of this rank's stream by ending its own (see `peer_closed`): wait for
        # that briefly, so that stopping the server cancels nothing and peers see a clean close.
        with self._incoming:
            linger = min(2.0, max(0.0, deadline - time.monotonic()))
            self._incoming.wait_for(lambda: not self._open_incoming, linger)
        if self._server is not None:
            self._server.stop(grace=1.0).wait(5.0)
        if self._workers is not None:
            self._workers.shutdown(wait=False)
        for channel in self._channels.values():
            channel.close()

    def incoming_opened(self, peer: int) -> None:
        with self._incoming:
            self._open_incoming.add(peer)

    def incoming_ended(self, peer: int, clean: bool) -> None:
        """`peer`'s stream to this rank ended: cleanly when it closed its communicator, else it is gone."""
        with self._incoming:
            self._open_incoming.discard(peer)
            self._incoming.notify_all()
        if clean:
            self.peer_closed(peer)
        else:
            reason = (
                "its stream to this rank ended without a goodbye: the process died, or the network failed"
            )
            if not self.closing and self.mailbox.mark_lost(peer, reason):
                log.warning("rank %d: %s is gone: %s", self.rank, self.describe_peer(peer), reason)

    def peer_closed(self, peer: int) -> None:
        """`peer` closed its communicator: it sends nothing more and takes nothing more, so end the stream
        to it too (after what is queued), which lets its server stop without cancelling anything."""
        self.mailbox.mark_closed(peer)
        outbox = self._outboxes.get(peer)
        if outbox is not None:
            outbox.end()
