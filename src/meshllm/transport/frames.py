"""Framed links: one TCP connection (plaintext or mutual TLS) carrying length-prefixed frames, or, between
processes of one machine, a Unix socket of Linux's abstract namespace carrying the same.

The layer under both of meshllm's data paths: the stages' step links (step_link.py) and the
communicator's peer links (comm/links.py). gRPC stays the control plane (Info, Load, the
communicator's rendezvous); the bytes of every step and every communicator message travel here, where a
round trip from Python costs a socket write and a read, not gRPC's threads and HTTP/2 framing.

A frame is a 5-byte header (the body's length, little-endian u32, and a kind byte) and the body. A link
opens with a HELLO frame from the caller (a JSON object: the cluster token, the protocol it speaks and
what that protocol needs) answered by READY (a JSON object whose "error", when not empty, says why the
link is refused). After READY, each protocol has kinds of its own (from 3 up).

`Link` is written from several threads (writes are serialised) and read from one: blocking (`read`) or
as bytes arrive on a socket someone else watches (`frames_ready`). TLS state lives in memory
(`ssl.MemoryBIO`), so a thread waiting for bytes never holds the lock a writer needs.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import struct
import sys
import threading
import uuid
from dataclasses import dataclass
from typing import Any

from meshllm.transport.rpc import MAX_MESSAGE_BYTES
from meshllm.transport.tls import TlsFiles, ssl_context

HEADER = struct.Struct("<IB")  # the body's length, the frame's kind
HELLO, READY = 1, 2  # every protocol's first two kinds; its own start at 3
OPEN_TIMEOUT = 30.0  # seconds a link may take to open by default
_CHUNK = 256 << 10  # bytes `Link.frames_ready` reads at most at once (a larger frame takes several reads)
LINKS_ENV = "MESHLLM_LINKS"  # "0": steps and communicator messages go over gRPC streams instead
LOCAL_LINKS_ENV = "MESHLLM_LOCAL_LINKS"  # "0": links between processes of one machine over TCP too


def links_enabled() -> bool:
    return os.environ.get(LINKS_ENV, "1") != "0"


def local_links_enabled() -> bool:
    """Whether links between processes of one machine go over Unix sockets (Linux's abstract ones)."""
    return sys.platform.startswith("linux") and os.environ.get(LOCAL_LINKS_ENV, "1") != "0"


class LinkError(Exception):
    """A link could not be opened, or was refused; the message says which and why."""


def whole_frames(received: bytearray) -> list[tuple[int, bytes]]:
    """The (kind, body) of every whole frame at the start of `received`, taken out of it; the bytes of
    a frame not yet whole stay. OSError for a frame longer than any message may be."""
    frames = []
    while len(received) >= HEADER.size:
        length, kind = HEADER.unpack_from(received)
        if length > MAX_MESSAGE_BYTES:
            raise OSError(f"a frame of {length} bytes (more than {MAX_MESSAGE_BYTES})")
        end = HEADER.size + length
        if len(received) < end:
            break
        frames.append((kind, bytes(received[HEADER.size : end])))
        del received[:end]
    return frames


def split_address(address: str) -> tuple[str, int]:
    """("host", port) of "host:port" (an IPv6 host may be in brackets)."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def join_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


class Tls:
    """TLS over a socket that one thread reads and others write: the TLS state lives in memory
    (`ssl.MemoryBIO`) behind a lock held only while bytes are encrypted or decrypted, never across a
    socket call, so a reader waiting for bytes does not stop a writer."""

    def __init__(self, context: ssl.SSLContext, server_side: bool, hostname: str | None = None):
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.session = context.wrap_bio(
            self.incoming, self.outgoing, server_side=server_side, server_hostname=hostname
        )
        self.lock = threading.Lock()

    def handshake(self, sock: socket.socket) -> None:
        while True:
            try:
                self.session.do_handshake()
                break
            except ssl.SSLWantReadError:
                pending = self.outgoing.read()
                if pending:
                    sock.sendall(pending)
                data = sock.recv(65536)
                if not data:
                    raise OSError("the peer closed the connection during the TLS handshake") from None
                self.incoming.write(data)
        pending = self.outgoing.read()
        if pending:
            sock.sendall(pending)

    def encrypt(self, data: bytes) -> bytes:
        with self.lock:
            self.session.write(data)
            return self.outgoing.read()  # with anything a read left to send, in order

    def decrypt(self, size: int) -> bytes | None:
        """Up to `size` bytes; None when more must be received first, b"" once the peer closed."""
        with self.lock:
            try:
                return self.session.read(size)
            except ssl.SSLWantReadError:
                return None
            except ssl.SSLZeroReturnError:
                return b""

    def feed(self, data: bytes) -> None:
        with self.lock:
            self.incoming.write(data)


class Link:
    """One framed TCP connection, in plaintext or mutual TLS; writes from several threads are
    serialised, reads come from one."""

    def __init__(self, sock: socket.socket, tls: Tls | None = None):
        self.sock = sock
        self.tls = tls
        self._write_lock = threading.Lock()
        self._received = bytearray()  # bytes of frames not yet whole (`frames_ready`)
        self._chunk = bytearray(_CHUNK)  # what one `frames_ready` reads into
        self._chunk_view = memoryview(self._chunk)
        if sock.family == socket.AF_UNIX:  # a peer on this machine: its end is seen when it exits
            return
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for option, value in (("TCP_KEEPIDLE", 5), ("TCP_KEEPINTVL", 2), ("TCP_KEEPCNT", 3)):
            if hasattr(socket, option):  # a vanished peer is noticed in seconds (Linux names)
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)

    def send(self, kind: int, body: bytes | bytearray | memoryview) -> None:
        header = HEADER.pack(len(body), kind)
        with self._write_lock:
            if self.tls is not None:
                self.sock.sendall(self.tls.encrypt(b"".join((header, body))))
            elif len(body) < 65536:
                self.sock.sendall(b"".join((header, body)))
            else:  # no copy of a large body
                self.sock.sendall(header)
                self.sock.sendall(body)

    def send_json(self, kind: int, value: dict[str, Any]) -> None:
        self.send(kind, json.dumps(value).encode())

    def read(self) -> tuple[int, bytes | bytearray] | None:
        """The next frame, or None when the peer closed the connection. The body is the buffer it was
        received into (not copied again): the caller owns it."""
        header = self._exactly(HEADER.size)
        if header is None:
            return None
        length, kind = HEADER.unpack(header)
        if length > MAX_MESSAGE_BYTES:
            raise OSError(f"a frame of {length} bytes (more than {MAX_MESSAGE_BYTES})")
        body = self._exactly(length) if length else b""
        if body is None:
            return None
        return kind, body

    def frames_ready(self) -> list[tuple[int, bytes]] | None:
        """The frames made whole by what the socket holds now, read without waiting for more (call it
        once the socket is readable); None once the peer closed the connection."""
        if self.tls is None:
            # into a buffer kept for the link: `recv(1 << 20)` makes and frees a 1 MiB object each time,
            # which cost ~65 µs a read after a step had streamed the weights through the caches
            count = self.sock.recv_into(self._chunk)
            if not count:
                return None
            self._received += self._chunk_view[:count]
        else:
            data = self.sock.recv(65536)
            if not data:
                return None
            self.tls.feed(data)
            while (plain := self.tls.decrypt(1 << 20)) is not None:
                if not plain:
                    return None  # the peer ended the TLS session
                self._received += plain
        return whole_frames(self._received)

    def _exactly(self, size: int) -> bytearray | None:
        buffer = bytearray(size)
        view, received = memoryview(buffer), 0
        while received < size:
            if self.tls is None:
                count = self.sock.recv_into(view[received:], size - received)
            else:
                count = self._decrypted_into(view[received:], size - received)
            if count == 0:
                return None
            received += count
        return buffer

    def _decrypted_into(self, view: memoryview, size: int) -> int:
        assert self.tls is not None
        while True:
            plain = self.tls.decrypt(size)
            if plain is not None:
                view[: len(plain)] = plain
                return len(plain)
            data = self.sock.recv(65536)
            if not data:
                return 0
            self.tls.feed(data)

    def shutdown(self) -> None:
        """End the connection both ways; whoever reads it sees its end (the socket stays open)."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        self.shutdown()  # wakes a thread blocked reading it
        self.sock.close()


def close_listener(listener: socket.socket) -> None:
    """Stop listening; a thread blocked in `accept` on it wakes (with OSError)."""
    try:
        listener.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    listener.close()


@dataclass
class Listeners:
    """Where a process takes links: a TCP port, and a local socket beside it (`local_listener`)."""

    sockets: list[socket.socket]  # each wants a thread of its own accepting
    port: int
    local: str  # the local socket's name ("": none)

    def close(self) -> None:
        for listener in self.sockets:
            close_listener(listener)  # wakes its accepting thread


def listen(host: str, port: int) -> Listeners:
    """Listen on (host, port) (0: any free port) and on a local socket. OSError when the port cannot be
    bound."""
    listener = socket.create_server((host, port), family=family(host))
    local = local_listener()
    if local is None:
        return Listeners([listener], int(listener.getsockname()[1]), "")
    return Listeners([listener, local[0]], int(listener.getsockname()[1]), local[1])


def local_listener() -> tuple[socket.socket, str] | None:
    """A listener on a Unix socket of Linux's abstract namespace, with a random name, and that name;
    None where there is no such namespace (macOS) or local sockets are off (MESHLLM_LOCAL_LINKS=0).

    A process listening on TCP listens here too and says the name beside its port: a caller on the same
    machine, in the same network namespace, connects here instead (a write of a step's 2 KiB and the
    peer's wake-up cost less than over loopback TCP); anywhere else the name does not exist and the
    caller takes the TCP port. What is said on the link (hello, token, TLS) is the same either way."""
    if not local_links_enabled():
        return None
    name = f"meshllm-{uuid.uuid4().hex}"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind("\0" + name)
        listener.listen(64)
    except OSError:
        listener.close()
        return None
    return listener, name


def connect(
    address: str, tls: TlsFiles | None = None, timeout: float = OPEN_TIMEOUT, local: str = ""
) -> Link:
    """A link to `address` ("host:port"), over mutual TLS with `tls`, before any hello; the socket keeps
    `timeout` for its reads and writes until the caller clears it. With `local`, the name of the Unix
    socket the same process listens on (`local_listener`), that socket where this machine has it, the TCP
    port where not; TLS checks the certificate against `address`'s host either way. LinkError says why
    the link could not be made."""
    try:
        host, port = split_address(address)
        sock = _connect_local(local, timeout) if local else None
        if sock is None:
            sock = socket.create_connection((host, port), timeout=timeout)
    except (OSError, ValueError) as error:
        raise LinkError(f"cannot connect to {address}: {error}") from None
    try:
        session = None
        if tls is not None:
            session = Tls(ssl_context(tls, server_side=False), server_side=False, hostname=host)
            session.handshake(sock)
    except OSError as error:
        sock.close()
        raise LinkError(f"{address}: the TLS handshake failed: {error}") from None
    return Link(sock, session)


def _connect_local(name: str, timeout: float) -> socket.socket | None:
    """A connection to the abstract Unix socket `name`, or None where this machine (this network
    namespace) has none by that name."""
    if not local_links_enabled():
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect("\0" + name)
    except OSError:
        sock.close()
        return None
    return sock


def dial(
    address: str,
    hello: dict[str, Any],
    tls: TlsFiles | None = None,
    timeout: float = OPEN_TIMEOUT,
    local: str = "",
) -> tuple[Link, dict[str, Any]]:
    """Open a link to `address` (or the same listener's local socket `local`, as `connect`), say `hello`
    and wait for READY: the link (blocking from then on) and READY's body. LinkError when it cannot be
    opened, or READY carries an error (its text)."""
    link = connect(address, tls, timeout, local)
    try:
        link.send_json(HELLO, hello)
        frame = link.read()
        if frame is None or frame[0] != READY:
            raise LinkError(f"{address} closed the link before it was ready")
        ready = json.loads(frame[1] or b"{}")
        if not isinstance(ready, dict):
            raise LinkError(f"{address} answered the hello with {ready!r}")
        if ready.get("error"):
            raise LinkError(str(ready["error"]))
        link.sock.settimeout(None)
    except (OSError, ValueError) as error:
        link.close()
        raise LinkError(f"{address}: {error}") from None
    except LinkError:
        link.close()
        raise
    return link, ready


def accept(sock: socket.socket, tls: TlsFiles | None, timeout: float = OPEN_TIMEOUT) -> Link:
    """The link of a connection a listener accepted, its TLS handshake done (a caller without a
    certificate of the cluster CA ends here, with OSError); reads and writes wait up to `timeout` until
    the caller clears it."""
    sock.settimeout(timeout)
    session = None
    if tls is not None:
        session = Tls(ssl_context(tls, server_side=True), server_side=True)
        session.handshake(sock)
    return Link(sock, session)


def read_hello(link: Link) -> dict[str, Any]:
    """The caller's hello (a JSON object). LinkError when the first frame is not one."""
    frame = link.read()
    if frame is None or frame[0] != HELLO:
        raise LinkError("the caller sent no hello")
    try:
        hello = json.loads(frame[1] or b"{}")
    except ValueError:
        hello = None
    if not isinstance(hello, dict):
        raise LinkError("the caller's hello is not a JSON object")
    return hello
