"""The communicator's framed links (transport/frames.py): one TCP (or mutual TLS) connection from each
rank to each peer, carrying its messages as frames.

Each rank listens for links on the host of its own address, at the port its `Hello` reply announces
(`link_port`). A rank dials one link to each peer; the link opens with a hello naming the protocol, the
cluster token, the caller's rank and its world size, which the accepting rank checks before it answers
READY (with an "error" when it refuses). After READY the caller sends PART frames only, each the body of
one `CommMessage` part exactly as the gRPC `Exchange` stream carries it (wire.py), the last a goodbye when
it closes its communicator; the accepting rank reads them on a thread of the link's own into an
`IncomingStream` (incoming.py), the code the gRPC stream feeds too. Nothing comes back on a link after
READY: a rank's messages to a peer go on its own link to that peer, the peer's on the peer's.

Sending (`LinkSender`): a message that fits one part, sent while nothing is queued for the peer, is
written by the caller's thread itself (`Outbox.claim`); the others go through the peer's `Outbox` and
are written by the link's sending thread. On a 2-core machine handing a message to a sleeping thread
cost ~0.1 ms each way of a round trip (docs/communicator.md has the figures).

A peer whose process dies closes its connections: the link it dialled to this rank ends without a
goodbye, and it counts as lost at once. One whose machine vanishes is found by TCP keepalive (frames.py)
within seconds.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from typing import Any, Protocol

from meshllm.transport import frames
from meshllm.transport.comm.errors import CommAuthError, CommError, PeerLostError
from meshllm.transport.comm.incoming import IncomingStream, StreamError
from meshllm.transport.comm.mailbox import Mailbox
from meshllm.transport.comm.outbox import Outbox, OutgoingMessage
from meshllm.transport.frames import READY, Link, LinkError
from meshllm.transport.rpc import TOKEN_METADATA_KEY, handshake_problem, token_problem
from meshllm.transport.tls import TlsFiles

log = logging.getLogger(__name__)

PART = 3  # a frame whose body is one CommMessage part (after HELLO and READY, frames.py)
PROTOCOL = "comm"  # what a communicator link's hello says it speaks
REFUSED = "refuses this link"  # in every READY error, which the caller tells from a link that broke


class LinkOwner(Protocol):
    """What the links need from the rank they serve (links.py's `Links`)."""

    rank: int
    world_size: int
    token: str | None
    mailbox: Mailbox
    closing: bool  # this rank is closing: a link that ends is no news

    def describe_peer(self, peer: int) -> str: ...
    def has_incoming(self, peer: int) -> bool: ...
    def incoming_opened(self, peer: int) -> None: ...
    def incoming_ended(self, peer: int, clean: bool, why: str = "") -> None: ...


def link_hello(rank: int, world_size: int, token: str | None) -> dict[str, Any]:
    """What a rank's link says first: the protocol, the cluster token, its rank and its world size."""
    return {"token": token or "", "protocol": PROTOCOL, "rank": rank, "world_size": world_size}


def dial_link(
    address: str,
    hello: dict[str, Any],
    tls: TlsFiles | None,
    timeout: float = frames.OPEN_TIMEOUT,
    who: str = "the peer",
    local: str = "",
) -> Link:
    """Open a link to the rank listening at `address` ("host:port"); `who` names it in errors ("rank 0:
    rank 1 (host:port)"). CommAuthError when it refuses the token or the TLS handshake fails, CommError
    when it refuses the link for another reason; LinkError when the link cannot be opened (the caller
    then sends over gRPC)."""
    try:
        link, _ = frames.dial(address, hello, tls, timeout, local)
    except LinkError as error:
        text = str(error)
        if REFUSED in text and "cluster token" in text:
            raise CommAuthError(
                f"{who} refused this rank's cluster token on its link port {address} ({text}); "
                "give every rank the same token"
            ) from None
        if REFUSED in text:
            raise CommError(f"{who} refused this rank's link ({text})") from None
        problem = handshake_problem(text, secure=True) if tls is not None and _tls_failure(text) else None
        if problem:
            raise CommAuthError(f"{who} {problem} (on its link port {address})") from None
        if tls is not None and _tls_failure(text):
            raise CommAuthError(
                f"{who} refused this rank's certificate on its link port {address} ({text}): give every "
                "rank a certificate of the same cluster CA"
            ) from None
        raise
    return link


def _tls_failure(text: str) -> bool:
    lowered = text.lower()
    return "tls handshake" in lowered or "alert" in lowered or "certificate" in lowered


def lose_peer(owner: LinkOwner, peer: int, reason: str, outbox: Outbox) -> None:
    """This rank's way to `peer` broke for `reason`: mark it lost (unless this rank is closing) and fail
    every message still queued for it, and every later one, saying so."""
    if not owner.closing and owner.mailbox.mark_lost(peer, reason):
        log.warning("rank %d: %s is gone: %s", owner.rank, owner.describe_peer(peer), reason)

    def failure() -> BaseException:
        return owner.mailbox.peer_error(peer, "send") or PeerLostError(
            f"rank {owner.rank}: send: {owner.describe_peer(peer)}: {reason}", peer
        )

    outbox.fail(failure)


class LinkSender:
    """This rank's messages to one peer over its link: each message whole and in order, the caller's own
    small ones written by the caller's thread when nothing is queued, the rest by the sending thread."""

    def __init__(self, owner: LinkOwner, peer: int, link: Link, timeout: float) -> None:
        self.owner = owner
        self.peer = peer
        self.link = link
        self.timeout = timeout
        self.outbox = Outbox(owner.rank)
        # A write that makes no progress for `timeout` breaks the link (the peer does not read).
        link.sock.settimeout(timeout)
        self._thread = threading.Thread(target=self._run, name=f"comm-link-{peer}", daemon=True)
        self._thread.start()

    def submit(self, message: OutgoingMessage, timeout: float) -> bool:
        """Send `message`, or queue it for the thread; False if the queue stayed full for `timeout`."""
        part = self.outbox.claim(message)
        if part is None:
            return self.outbox.put(message, timeout)
        try:
            self.link.send(PART, part)
        except OSError as error:
            self._broken(error)  # fails `message` too
        finally:
            self.outbox.release(message)
        return True

    def _run(self) -> None:
        try:
            for part in self.outbox:
                self.link.send(PART, part)
        except OSError as error:
            self._broken(error)
            return
        self.link.close()  # after the goodbye (or a failure): nothing more goes on this link

    def _broken(self, error: OSError) -> None:
        owner, peer = self.owner, self.peer
        if isinstance(error, TimeoutError):
            reason = f"it took nothing sent to it for {self.timeout:g} s (it does not read, or the network is stuck)"
        else:
            reason = f"the link to it broke ({error}): the process died, or the network failed"
        lose_peer(owner, peer, reason, self.outbox)
        self.link.shutdown()

    def end(self) -> None:
        """End the link after what is queued, with a goodbye."""
        self.outbox.end()

    def finish(self, timeout: float) -> bool:
        """Wait up to `timeout` for the goodbye to be written; else cut the link. True when it was."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            self.link.shutdown()  # wakes a write the peer does not take
            self._thread.join(1.0)
            return False
        return True

    def close(self) -> None:
        self.link.close()


class LinkListener:
    """Accepts the links peers dial to this rank, checks their hellos, and reads each on its own thread."""

    def __init__(self, owner: LinkOwner, tls: TlsFiles | None) -> None:
        self.owner = owner
        self.tls = tls
        self._listeners: frames.Listeners | None = None
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()  # accepted, until their thread ends
        self._threads: set[threading.Thread] = set()
        self._closed = False

    @property
    def local(self) -> str:
        """The local socket's name, beside the port ("": none)."""
        return self._listeners.local if self._listeners is not None else ""

    def start(self, host: str, port: int) -> int:
        """Listen on (host, port) (0: any free port), and on a local socket (its name in `local`); the
        port bound. OSError when it cannot be bound."""
        listeners = self._listeners = frames.listen(host, port)
        for listener in listeners.sockets:
            self._spawn(self._accept, "comm-links", listener)
        return listeners.port

    def _spawn(self, target: Callable[..., None], name: str, *args: Any) -> None:
        thread = threading.Thread(target=self._tracked, args=(target, *args), name=name, daemon=True)
        thread.start()
        with self._lock:
            self._threads.add(thread)

    def _tracked(self, target: Callable[..., None], *args: Any) -> None:
        try:
            target(*args)
        finally:
            with self._lock:
                self._threads.discard(threading.current_thread())  # (or `_spawn` adds it, ended)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                sock, _ = listener.accept()
            except OSError:
                return  # closed
            with self._lock:
                if self._closed:
                    sock.close()
                    return
                self._sockets.add(sock)
            self._spawn(self._serve, f"comm-link-in-{self.owner.rank}", sock)

    def _serve(self, sock: socket.socket) -> None:
        owner = self.owner
        try:
            link = frames.accept(sock, self.tls)  # a caller without a cluster certificate ends here
            self._read(link, self._check(link))
        except (OSError, ValueError, LinkError) as error:
            log.debug("rank %d: a link ended: %s", owner.rank, error)
        finally:
            with self._lock:
                self._sockets.discard(sock)
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def _check(self, link: Link) -> int:
        """Check the caller's hello and answer READY: the caller's rank, or LinkError when refused."""
        owner = self.owner
        hello = frames.read_hello(link)
        presented = hello.get("token") or None
        problem = token_problem(owner.token, {TOKEN_METADATA_KEY: presented} if presented else {})
        source, world_size = hello.get("rank"), hello.get("world_size")
        why = ""
        if problem:
            why = f"it carried {problem}"
        elif hello.get("protocol") != PROTOCOL:
            why = f"this port takes communicator links, not {hello.get('protocol')!r} links"
        elif world_size != owner.world_size:
            why = f"rank {owner.rank} is one of {owner.world_size} ranks, the caller one of {world_size}"
        elif not isinstance(source, int) or not 0 <= source < owner.world_size or source == owner.rank:
            why = f"rank {source!r} is not a peer of rank {owner.rank}"
        elif owner.has_incoming(source):
            why = f"rank {source} has a link to rank {owner.rank} already"
        refusal = f"rank {owner.rank} {REFUSED}: {why}" if why else ""
        link.send_json(READY, {"error": refusal})
        if refusal:
            raise LinkError(refusal)
        assert isinstance(source, int)
        link.sock.settimeout(None)
        owner.incoming_opened(source)
        return source

    def _read(self, link: Link, source: int) -> None:
        """Read `source`'s parts until its goodbye, or until the link ends (then it is gone)."""
        incoming = IncomingStream(source, self.owner.mailbox)
        broken = ""
        try:
            while not incoming.said_goodbye:  # nothing may follow a goodbye
                frame = link.read()
                if frame is None:
                    break
                kind, body = frame
                if kind != PART:
                    broken = f"a frame of kind {kind} on a communicator link"
                    break
                incoming.feed(memoryview(body).toreadonly())  # arrays made from it copy, as from bytes
        except StreamError as error:
            broken = str(error)
        except OSError as error:
            log.debug("rank %d: the link from rank %d broke: %s", self.owner.rank, source, error)
        finally:
            self.owner.incoming_ended(source, clean=incoming.clean and not broken, why=broken)

    def close(self) -> None:
        """Stop accepting, end every link accepted, and wait briefly for their threads."""
        with self._lock:
            self._closed = True
            sockets = list(self._sockets)
        if self._listeners is not None:
            self._listeners.close()  # wakes the accepting threads
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes its reading thread
            except OSError:
                pass
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join(1.0)
