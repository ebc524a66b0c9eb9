"""The communicator: point-to-point messages and collectives across N ranks.

    with Communicator(rank, world_size, base_port=50200, token=token) as comm:
        comm.send(hidden_states, dest=rank + 1, tag=step)
        logits = comm.recv(source=rank - 1, tag=step, like="torch")
        total = comm.all_reduce(partial, op="sum")

Every rank runs a `Comm` gRPC server on its own address (the rendezvous) and sends its messages to every
other rank over one framed TCP link, or over a gRPC stream where no link can be opened (see links.py).
Messages from one source with one tag arrive in order and exactly once; a message may arrive before its
`recv` is posted and then waits in the mailbox. Every blocking call gives up
after `timeout` seconds with a `CommTimeoutError` naming the peer, and fails early with a `PeerLostError`
naming the peer when a rank it needs dies. The API is blocking and thread-safe for point-to-point calls;
collectives must be called by every rank in the same order, from one thread at a time. From async code,
call it through `asyncio.to_thread`. docs/communicator.md has the whole story.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import logging
import operator
import threading
import weakref
from dataclasses import dataclass
from typing import Any

from meshllm.transport.comm import collectives
from meshllm.transport.comm.errors import CommError, CommTimeoutError
from meshllm.transport.comm.links import Links
from meshllm.transport.comm.mailbox import COLLECTIVE, POINT_TO_POINT, Arrival, Mailbox
from meshllm.transport.comm.reduce import REDUCE_OPS
from meshllm.transport.comm.wire import Payload
from meshllm.transport.tensors import check_framework, dtype_name, framework_of, from_buffer
from meshllm.transport.tls import TlsFiles

log = logging.getLogger(__name__)

# all_reduce sends every array to every rank (one round, N - 1 copies of the array sent per rank) while
# that is at most this many bytes per rank; beyond, the ring (2 (N - 1) rounds, 2 (N - 1) / N of the array
# per rank). Measured on loopback: with 2 ranks direct wins up to ~1 MiB arrays, with 4 up to ~256 KiB.
RING_THRESHOLD = 1 << 20

_INT64 = (-(1 << 63), (1 << 63) - 1)


@dataclass(frozen=True)
class ArrayKind:
    """How to hand an array back: in which framework, and for torch on which device (None: the CPU)."""

    framework: str
    device: Any = None

    @classmethod
    def of(cls, array: Any) -> ArrayKind:
        framework = framework_of(array)
        device = array.device if framework == "torch" and array.device.type != "cpu" else None
        return cls(framework, device)

    @classmethod
    def resolve(cls, like: Any, default: str) -> ArrayKind:
        """`like` is None (the communicator's default framework), a framework name, or an array to match."""
        if like is None:
            like = default
        if isinstance(like, str):
            check_framework(like)
            return cls(like)
        return cls.of(like)

    def build(self, payload: Payload) -> Any:
        """The payload as an array of this kind (numpy gives float32 for bfloat16). Without a copy when the
        payload's data is writable (a received message joined from parts, a reduction's result): the
        result then owns it."""
        return from_buffer(payload.data, payload.shape, payload.dtype, self.framework, self.device)


class Communicator:
    """One rank of a group of `world_size` ranks; see the module docstring and docs/communicator.md.

    addresses: "host:port" of every rank, indexed by rank; or give `host` and `base_port` and rank i is at
    host:base_port+i. This rank listens on its own address only. The constructor returns once every
    peer answered (they may start in any order), or raises after `timeout` seconds.
    token: the cluster token; when set, every call carries it and the server refuses calls without it.
    tls: this rank's certificates (`meshllm.transport.tls.TlsFiles`: the cluster CA, its certificate and
    key): every connection (gRPC and links) is then mutual TLS and a peer without a certificate of that
    CA is refused at the handshake; None: plaintext (loopback, or a network you trust).
    link_port: where this rank takes its peers' message links, on the host of its address (0: any free
    port); `Hello` tells the peers.
    framework: what `recv` and a non-root `broadcast` return when given no `like` ("numpy", "torch" or
    "mlx"). Arrays handed in come back in their own framework, dtype (and torch device).
    """

    def __init__(
        self,
        rank: int,
        world_size: int,
        addresses: list[str] | None = None,
        host: str = "127.0.0.1",
        base_port: int | None = None,
        token: str | None = None,
        timeout: float = 30.0,
        *,
        tls: TlsFiles | None = None,
        framework: str = "numpy",
        ring_threshold: int = RING_THRESHOLD,
        link_port: int = 0,
    ) -> None:
        if world_size < 1:
            raise ValueError(f"world_size must be at least 1, not {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
        if addresses is None:
            if base_port is None:
                raise ValueError("give every rank's address (addresses=[...]) or host and base_port")
            addresses = [f"{host}:{base_port + index}" for index in range(world_size)]
        if len(addresses) != world_size:
            raise ValueError(f"{len(addresses)} addresses for {world_size} ranks")
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, not {timeout}")
        if not 0 <= link_port < 65536:
            raise ValueError(f"link_port {link_port} is not a port (0: any free port)")
        ArrayKind.resolve(framework, framework)  # validates the name
        self.rank = rank
        self.world_size = world_size
        self.addresses = list(addresses)
        self.timeout = float(timeout)
        self.framework = framework
        self.ring_threshold = ring_threshold
        self._mailbox = Mailbox(rank, self.describe_peer)
        self._links = Links(
            rank, self.addresses, token or None, self._mailbox, self.describe_peer, tls, link_port
        )
        self._collective_lock = threading.Lock()
        self._collectives = 0  # collectives started on this rank; numbers the next one
        self._closed = False
        try:
            self._links.start(self.timeout)
        except BaseException:
            self._links.close(1.0)
            self._mailbox.close()
            raise
        _open_communicators.add(self)
        log.debug("rank %d of %d ready at %s", rank, world_size, self.address)

    @property
    def address(self) -> str:
        return self.addresses[self.rank]

    @property
    def link_port(self) -> int:
        """The port this rank takes message links on; 0 when it takes none (`MESHLLM_LINKS=0`)."""
        return self._links.link_port

    def describe_peer(self, peer: int) -> str:
        return f"rank {peer} ({self.addresses[peer]})"

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return (
            f"Communicator(rank={self.rank}, world_size={self.world_size}, address={self.address!r}, {state})"
        )

    def __enter__(self) -> Communicator:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ---- point to point ----

    def send(self, array: Any, dest: int, tag: int = 0, *, timeout: float | None = None) -> None:
        """Send `array` to rank `dest` with `tag`.

        Returns once the message is queued for `dest` (the array was copied, so the caller may change it
        right away); it waits only while 256 MiB are already queued for that peer. If delivery fails
        later, the peer is marked lost and the next call that needs it raises `PeerLostError`.
        """
        done = self.isend(array, dest, tag, timeout=timeout)
        if done.done():
            done.result()  # raises at once when the peer is known to be gone or the queue stayed full

    def isend(
        self, array: Any, dest: int, tag: int = 0, *, timeout: float | None = None
    ) -> concurrent.futures.Future[None]:
        """Like `send`; the future completes once the whole message was written to its link or stream,
        or fails as `send` would."""
        dest, tag = self._check_rank(dest, "dest"), self._check_tag(tag)
        what = f"send to rank {dest} with tag {tag}"
        return self._post(dest, POINT_TO_POINT, tag, "", Payload.copy_of(array), what, self._timeout(timeout))

    def recv(self, source: int, tag: int = 0, *, like: Any = None, timeout: float | None = None) -> Any:
        """The next array from rank `source` with `tag`, waiting for it up to `timeout` seconds.

        like: a framework name ("numpy", "torch", "mlx") or an array whose framework (and torch device)
        the result takes; default: the communicator's `framework`. numpy has no bfloat16, so bfloat16
        received as numpy comes back as float32 (exactly).
        """
        source, tag = self._check_rank(source, "source"), self._check_tag(tag)
        kind = ArrayKind.resolve(like, self.framework)
        key = (POINT_TO_POINT, source, tag)
        arrival = self._mailbox.take(key, self._timeout(timeout), f"recv with tag {tag}")
        if arrival.payload is None:
            raise CommError(
                f"rank {self.rank}: recv with tag {tag}: rank {source} sent a message without data"
            )
        return kind.build(arrival.payload)

    # ---- collectives ----

    def broadcast(self, array: Any, root: int, *, like: Any = None, timeout: float | None = None) -> Any:
        """The root's array, on every rank. The root passes its array (and gets it back as it is).

        Other ranks pass None, or an array of the same shape and dtype whose framework the result takes
        (it is checked, not written into); `like` works as in `recv`.
        """
        root = self._check_rank(root, "root")
        if self.rank == root and array is None:
            raise ValueError(f"rank {root} is the root of this broadcast: give it the array to send")
        payload = Payload.view_of(array) if self.rank == root else None
        result = collectives.broadcast(self._collective("broadcast", timeout), root, payload)
        if self.rank == root:
            return array
        if array is None:
            return ArrayKind.resolve(like, self.framework).build(result)
        mine = (dtype_name(array), tuple(array.shape))
        if mine != (result.dtype, result.shape):
            raise CommError(
                f"rank {self.rank}: broadcast from rank {root}: the root sent {result.dtype} "
                f"{list(result.shape)}, this rank expected {mine[0]} {list(mine[1])}"
            )
        return ArrayKind.of(array).build(result)

    def all_reduce(self, array: Any, op: str = "sum", *, timeout: float | None = None) -> Any:
        """The elementwise `op` ("sum", "max", "min", "mean") of every rank's array, on every rank.

        Every rank passes the same shape and dtype; the result has them too, in the caller's framework.
        bfloat16 and float16 are reduced in float32; "mean" of integers is the floor of the mean.
        """
        if op not in REDUCE_OPS:
            raise ValueError(f"unknown reduce op {op!r}: use one of {', '.join(REDUCE_OPS)}")
        kind = ArrayKind.of(array)
        payload = Payload.view_of(array)
        call = self._collective("all_reduce", timeout)
        return kind.build(collectives.all_reduce(call, payload, op, self.ring_threshold))

    def barrier(self, *, timeout: float | None = None) -> None:
        """Return once every rank has entered the barrier."""
        collectives.barrier(self._collective("barrier", timeout))

    # ---- closing ----

    def close(self, timeout: float | None = None) -> None:
        """Deliver what was sent, then stop the server and drop the links and streams. Safe to call twice.

        Peers see this rank as closed, not lost: their receives from it fail at once with a CommError.
        """
        if self._closed:
            return
        self._closed = True
        self._links.close(self._timeout(timeout))
        self._mailbox.close()
        _open_communicators.discard(self)

    # ---- internals ----

    def _timeout(self, timeout: float | None) -> float:
        return self.timeout if timeout is None else timeout

    def _check_rank(self, peer: int, role: str) -> int:
        peer = operator.index(peer)
        if not 0 <= peer < self.world_size:
            raise ValueError(f"{role} {peer} is not a rank of this communicator (0..{self.world_size - 1})")
        return peer

    def _check_tag(self, tag: int) -> int:
        tag = operator.index(tag)
        if not _INT64[0] <= tag <= _INT64[1]:
            raise ValueError(f"tag {tag} does not fit in 64 bits")
        return tag

    def _post(
        self,
        dest: int,
        channel: int,
        tag: int,
        collective: str,
        payload: Payload | None,
        what: str,
        timeout: float,
    ) -> concurrent.futures.Future[None]:
        if dest == self.rank:  # to itself: straight into the mailbox
            done: concurrent.futures.Future[None] = concurrent.futures.Future()
            if self._closed:
                done.set_exception(CommError(f"rank {self.rank}: {what}: this communicator is closed"))
            else:
                self._mailbox.put((channel, dest, tag), Arrival(dest, collective, payload))
                done.set_result(None)
            return done
        return self._links.submit(dest, channel, tag, collective, payload, what, timeout)

    def _collective(self, name: str, timeout: float | None) -> _CollectiveCall:
        with self._collective_lock:
            seq = self._collectives
            self._collectives += 1
        return _CollectiveCall(self, name, seq, self._timeout(timeout))


class _CollectiveCall:
    """One collective call's messages: on the collective channel, tagged with the call's number."""

    def __init__(self, comm: Communicator, name: str, seq: int, timeout: float) -> None:
        self.comm = comm
        self.rank = comm.rank
        self.world_size = comm.world_size
        self.name = name
        self.seq = seq
        self.timeout = timeout

    def post(self, dest: int, payload: Payload | None) -> concurrent.futures.Future[None]:
        what = f"{self.name} #{self.seq}: sending to rank {dest}"
        done = self.comm._post(dest, COLLECTIVE, self.seq, self.name, payload, what, self.timeout)
        if done.done():
            done.result()  # a peer known to be gone fails the collective now
        return done

    def take(self, source: int) -> Payload | None:
        what = f"{self.name} #{self.seq}"
        arrival = self.comm._mailbox.take(
            (COLLECTIVE, source, self.seq), self.timeout, what, any_lost_fails=True
        )
        if arrival.collective != self.name:
            raise CommError(
                f"rank {self.rank}: collective #{self.seq} is {self.name} on this rank but {arrival.collective} "
                f"on rank {source}: every rank must call the same collectives in the same order"
            )
        return arrival.payload

    def wait(self, sends: list[concurrent.futures.Future[None]]) -> None:
        what = f"{self.name} #{self.seq}"
        finished, pending = concurrent.futures.wait(sends, self.timeout)
        if pending:
            raise CommTimeoutError(
                f"rank {self.rank}: {what}: its messages were not written within {self.timeout:g} s "
                "(a peer does not read, or the network is stuck)"
            )
        for done in finished:
            done.result()


# Communicators still open at interpreter exit are closed, so what they sent is delivered.
_open_communicators: weakref.WeakSet[Communicator] = weakref.WeakSet()


@atexit.register
def _close_open_communicators() -> None:
    for comm in list(_open_communicators):
        comm.close(timeout=min(comm.timeout, 5.0))
