"""The communicator's links: this rank's `Comm` server, and the way its messages reach every peer.

gRPC is the control plane: every rank runs a `Comm` server on its own address and says `Hello` to every
peer, retrying until the peer answers (the rendezvous, with the token, rank and world-size checks). The
reply says on which port the peer takes framed links (`link_port`); this rank then dials one link to it
(framed.py, over transport/frames.py, the framing the stages' step links use too) and sends it every
message on that link. Where no link can be had (`MESHLLM_LINKS=0` on either side, or the link cannot be
opened) that peer's messages go over one long-lived gRPC `Exchange` stream instead, with a warning
saying why; both paths carry the same `CommMessage` parts and are read by the same `IncomingStream`.

On the gRPC path (streams.py) gRPC's sending thread takes the peer's `Outbox` (outbox.py) part by part;
the server (server.py) reads the streams peers keep open to this rank. The blocking (thread-based) gRPC
API is used on purpose: a bare round trip costs ~0.4 ms through gRPC's threads against ~0.75 ms with
grpc.aio on an event loop in a background thread.

A peer is known to be gone when its stream or link to this rank ends without a goodbye, or when this
rank's stream or link to it breaks. A peer that closes its communicator sends a goodbye as the last part
of its stream or link; the other ranks then end theirs to it as well, so it stops without cutting
anything.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable

import grpc

from meshllm.transport.comm.errors import CommAuthError, CommError, CommTimeoutError
from meshllm.transport.comm.framed import LinkListener, LinkSender, dial_link, link_hello
from meshllm.transport.comm.mailbox import Mailbox
from meshllm.transport.comm.outbox import OutgoingMessage
from meshllm.transport.comm.server import CommServicer
from meshllm.transport.comm.streams import StreamSender, describe_rpc_error
from meshllm.transport.comm.wire import Payload
from meshllm.transport.frames import (
    LINKS_ENV,
    OPEN_TIMEOUT,
    LinkError,
    join_address,
    links_enabled,
    split_address,
)
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


class Links:
    """The server, the link listener and the senders of one rank; every method may be called from any
    thread."""

    def __init__(
        self,
        rank: int,
        addresses: list[str],
        token: str | None,
        mailbox: Mailbox,
        describe_peer: Callable[[int], str],
        tls: TlsFiles | None = None,
        link_port: int = 0,
    ) -> None:
        self.rank = rank
        self.tls = tls
        self.addresses = addresses
        self.world_size = len(addresses)
        self.token = token
        self.mailbox = mailbox
        self.describe_peer = describe_peer
        self.closing = False
        self.metadata = token_metadata(token)
        self.link_port = 0  # where this rank takes links, as `Hello` announces it; 0: none
        self._wanted_link_port = link_port
        self._timeout = 30.0  # the communicator's, set by `start`
        self._server: grpc.Server | None = None
        self._workers: concurrent.futures.ThreadPoolExecutor | None = None
        self._listener: LinkListener | None = None
        self._channels: dict[int, grpc.Channel] = {}
        self._senders: dict[int, LinkSender | StreamSender] = {}
        self._incoming = threading.Condition()  # guards _open_incoming
        self._open_incoming: set[int] = set()  # peers whose stream or link to this rank is open

    @property
    def link_socket(self) -> str:
        """The local socket this rank takes links on beside `link_port`, as `Hello` announces it ("": none)."""
        return self._listener.local if self._listener is not None else ""

    def start(self, timeout: float) -> None:
        """Listen on this rank's address (and for links), then connect to every peer (each must answer
        `Hello`)."""
        self._timeout = timeout
        address = self.addresses[self.rank]
        host, _ = split_address(address)
        if links_enabled():  # before the server: a peer that got `Hello`'s answer finds the links open
            self._listener = LinkListener(self, self.tls)
            try:
                self.link_port = self._listener.start(host, self._wanted_link_port)
            except OSError as error:
                raise CommError(
                    f"rank {self.rank} cannot listen for links on {join_address(host, self._wanted_link_port)} "
                    f"({error}): is the port already in use (link_port=0 takes any free one)?"
                ) from None
        else:
            log.warning("rank %d: %s=0: messages go over gRPC streams (slower)", self.rank, LINKS_ENV)
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
        reply = self._hello(stub, peer, deadline, timeout)
        link = self._open_link(peer, reply.link_port, reply.link_socket, deadline)
        if link is not None:
            self._senders[peer] = link
            log.debug("rank %d linked to %s", self.rank, self.describe_peer(peer))
        else:
            self._senders[peer] = StreamSender(self, peer, channel)
            log.debug("rank %d streams to %s", self.rank, self.describe_peer(peer))

    def _open_link(self, peer: int, link_port: int, link_socket: str, deadline: float) -> LinkSender | None:
        """The link to `peer` (on its local socket where it is on this machine), or None (after a
        warning) when its messages must go over gRPC."""
        if self._listener is None:
            return None  # links are off here (warned at start)
        if not link_port:
            why = f"it takes no links ({LINKS_ENV}=0 there, or an older meshllm)"
        else:
            host, _ = split_address(self.addresses[peer])
            address = join_address(host, link_port)
            try:
                limit = min(OPEN_TIMEOUT, max(1.0, deadline - time.monotonic()))
                hello = link_hello(self.rank, self.world_size, self.token)
                who = f"rank {self.rank}: {self.describe_peer(peer)}"
                link = dial_link(address, hello, self.tls, limit, who, link_socket)
                return LinkSender(self, peer, link, self._timeout)
            except LinkError as error:
                why = f"no link to {address}: {error}"
        log.warning(
            "rank %d: messages to %s go over its gRPC stream (slower): %s",
            self.rank,
            self.describe_peer(peer),
            why,
        )
        return None

    def _hello(
        self, stub: comm_pb2_grpc.CommStub, peer: int, deadline: float, timeout: float
    ) -> comm_pb2.CommHelloReply:
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
                reply = stub.Hello(request, metadata=self.metadata, timeout=remaining, wait_for_ready=True)
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
        return reply

    def _raise_if_handshake_fails(
        self, stub: comm_pb2_grpc.CommStub, peer: int, request: comm_pb2.CommHelloRequest
    ) -> None:
        """After waiting in vain: one call that fails fast tells whether the TLS handshake is the reason."""
        try:
            stub.Hello(request, metadata=self.metadata, timeout=2.0)
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
        """Send one message to `dest`, or queue it, and return; the future completes once all of it was
        written."""
        done: concurrent.futures.Future[None] = concurrent.futures.Future()
        error = self.mailbox.peer_error(dest, what)
        if error is not None:
            done.set_exception(error)
        elif not self._senders[dest].submit(
            OutgoingMessage(channel, tag, collective, payload, done), timeout
        ):
            done.set_exception(
                CommTimeoutError(
                    f"rank {self.rank}: {what}: {self.describe_peer(dest)} has not taken what was sent "
                    f"to it before within {timeout:g} s (it does not read, or the network is stuck)"
                )
            )
        return done

    def close(self, timeout: float) -> None:
        """End every stream and link after what was queued (waiting up to `timeout`), then stop serving."""
        self.closing = True
        for sender in self._senders.values():
            sender.end()
        deadline = time.monotonic() + timeout
        for peer, sender in self._senders.items():
            if not sender.finish(max(0.0, deadline - time.monotonic())):
                log.warning(
                    "rank %d: %s did not take the end of its stream", self.rank, self.describe_peer(peer)
                )
        # Each peer answers the end of this rank's stream by ending its own (see `peer_closed`): wait for
        # that briefly, so that stopping cuts nothing and peers see a clean close.
        with self._incoming:
            linger = min(2.0, max(0.0, deadline - time.monotonic()))
            self._incoming.wait_for(lambda: not self._open_incoming, linger)
        if self._listener is not None:
            self._listener.close()
        if self._server is not None:
            self._server.stop(grace=1.0).wait(5.0)
        if self._workers is not None:
            self._workers.shutdown(wait=False)
        for sender in self._senders.values():
            sender.close()
        for channel in self._channels.values():
            channel.close()

    def has_incoming(self, peer: int) -> bool:
        with self._incoming:
            return peer in self._open_incoming

    def incoming_opened(self, peer: int) -> None:
        with self._incoming:
            self._open_incoming.add(peer)

    def incoming_ended(self, peer: int, clean: bool, why: str = "") -> None:
        """`peer`'s stream or link to this rank ended: cleanly when it closed its communicator, else it is
        gone (`why`: what was wrong with what it sent)."""
        with self._incoming:
            self._open_incoming.discard(peer)
            self._incoming.notify_all()
        if clean:
            self.peer_closed(peer)
            return
        if why:
            reason = f"what it sent to this rank broke the protocol ({why})"
        else:
            reason = (
                "its stream to this rank ended without a goodbye: the process died, or the network failed"
            )
        if not self.closing and self.mailbox.mark_lost(peer, reason):
            log.warning("rank %d: %s is gone: %s", self.rank, self.describe_peer(peer), reason)

    def peer_closed(self, peer: int) -> None:
        """`peer` closed its communicator: it sends nothing more and takes nothing more, so end the stream
        or link to it too (after what is queued), which lets it stop without cutting anything."""
        self.mailbox.mark_closed(peer)
        sender = self._senders.get(peer)
        if sender is not None:
            sender.end()
