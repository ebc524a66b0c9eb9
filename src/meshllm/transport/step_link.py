"""Step links: the Forward chain over framed TCP (or a local socket), read and written by threads of
their own.

A round trip on a gRPC stream from Python costs about 0.25 ms on loopback, and each hand-off between a
process's event loop and its compute thread about 0.1 ms more; a hop of the gRPC chain paid one round
trip and four hand-offs. A step link is one TCP connection per hop carrying the very messages the gRPC
Forward stream carries (`StepRequest` down, `StepResult` up, so the codec and its checks are the same),
each framed by its length and kind. On a worker, the process's compute thread (where every other use of
the stage runs too, `meshllm.compute`) reads the link itself, runs each step and writes the output to
the next stage's link, or the sampled tokens back up; a second thread relays the results coming back
from the next stage. Nothing on the way touches an event loop or wakes another thread.

The framing, the hello and the TLS are frames.py's, shared with the communicator. A worker listens for
step links on a second port (`meshllm worker --step-port`, any free port by default; `Info` says which),
and on a local socket beside it that callers on the same machine use instead (`frames.listen`).
A chain is linked hop by hop: the coordinator dials the first worker, which dials the next stage before
it answers, so READY means the whole chain is linked. Where a link cannot be made (the port is
firewalled, a worker of an older version, `MESHLLM_LINKS=0`) the chain runs on the gRPC Forward
stream instead, with a warning saying why. A cluster with certificates runs its links over the same
mutual TLS as its gRPC calls (`tls.ssl_context`).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING

from google.protobuf.message import DecodeError

from meshllm import compute
from meshllm.errors import StageError
from meshllm.step import StageLost, StepResult
from meshllm.transport import frames
from meshllm.transport.frames import (
    OPEN_TIMEOUT,
    READY,
    Link,
    LinkError,
    links_enabled,
    split_address,
)
from meshllm.transport.proto import meshllm_pb2 as pb
from meshllm.transport.rpc import TOKEN_METADATA_KEY, token_problem
from meshllm.transport.stage_client import ForwardChain, PreparedStep, StageClient, StepsInFlight
from meshllm.transport.tls import TlsFiles

if TYPE_CHECKING:
    from meshllm.transport.stage_service import StageService

log = logging.getLogger(__name__)

STEP, RESULT, ABORT = 3, 4, 5  # after HELLO and READY (frames.py)
PROTOCOL = "steps"  # what a step link's hello says it speaks
RESULTS = "results"  # a link from the coordinator to the last stage, for that stage's results


class StepLinkError(LinkError):
    """A step link could not be opened (the chain then runs on gRPC)."""


def dial(
    address: str,
    token: str | None,
    tls: TlsFiles | None = None,
    timeout: float = OPEN_TIMEOUT,
    chain: str = "",
    protocol: str = PROTOCOL,
    local: str = "",
) -> Link:
    """Open a step link to the stage listening at `address` ("host:port"), or on its local socket
    `local` where that is on this machine (`frames.connect`), over mutual TLS with `tls`; it answers
    READY once its own link onwards is open. `chain` names the chain the link is part of (the
    coordinator's id for it); with `protocol` RESULTS the link is the one the last stage of that chain
    answers the coordinator on. StepLinkError says why it could not be opened."""
    hello = {"token": token or "", "protocol": protocol, "chain": chain}
    try:
        link, _ = frames.dial(address, hello, tls, timeout, local)
    except LinkError as error:
        raise StepLinkError(str(error)) from None
    return link


# ---- a worker's side ------------------------------------------------------------------------------


class StepLinkServer:
    """Accepts step links for one worker's stage and serves each on its own threads."""

    def __init__(self, service: StageService, next_address: Callable[[], tuple[str, str]]):
        self.service = service
        # the next stage's step link address ("" when last) and local socket ("" none); blocking
        self.next_address = next_address
        self._listeners: frames.Listeners | None = None
        self._links: set[Link] = set()
        self._hops: set[_Hop] = set()
        self._results: dict[str, Link] = {}  # chain id -> the link its results go to (on the last stage)
        self._closed = False

    def results_link(self, chain: str) -> Link | None:
        """Where this (last) stage sends the results of steps of `chain`: the coordinator's own link for
        them, or None (back up the chain)."""
        return self._results.get(chain) if chain else None

    @property
    def local(self) -> str:
        """The name of the Unix socket taking links from this machine ("": none)."""
        return self._listeners.local if self._listeners is not None else ""

    def start(self, host: str, port: int) -> int:
        """Listen on (host, port) (0: any free port), and on a local socket (`frames.local_listener`,
        its name in `local`); the port bound. OSError when it cannot be bound."""
        listeners = self._listeners = frames.listen(host, port)
        for listener in listeners.sockets:
            threading.Thread(target=self._accept, args=(listener,), name="step-links", daemon=True).start()
        return listeners.port

    def close(self) -> None:
        self._closed = True
        if self._listeners is not None:
            self._listeners.close()
        for hop in list(self._hops):
            hop.stop()  # the compute thread reading it sees its end, and the hop closes its links
        for link in list(self._links):
            link.shutdown()

    def _accept(self, listener: socket.socket) -> None:
        while not self._closed:
            try:
                sock, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(sock,), name="step-link", daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        tls = self.service.tls
        upstream: Link | None = None
        downstream: Link | None = None
        try:
            upstream = frames.accept(sock, tls)  # a caller without a cluster certificate ends here
            self._links.add(upstream)
            hello = frames.read_hello(upstream)
            chain = str(hello.get("chain") or "")
            if hello.get("protocol") == RESULTS:
                self._answer_results(upstream, hello, chain)
                return
            downstream = self._open(upstream, hello, chain)
            if downstream is not None:
                self._links.add(downstream)
            sock.settimeout(None)
            hop = _Hop(self.service, upstream, downstream, chain, self)
            self._hops.add(hop)
            try:
                hop.run()
            finally:
                self._hops.discard(hop)
        except (OSError, ValueError, LinkError) as error:
            log.debug("a step link ended: %s", error)
        finally:
            if upstream is None:
                sock.close()
            for link in (upstream, downstream):
                if link is not None:
                    self._links.discard(link)
                    link.close()

    def _refusal(self, hello: dict[str, object]) -> str:
        """Why a link with this hello is refused ("" when it is not)."""
        service = self.service
        presented = str(hello.get("token") or "") or None
        problem = token_problem(service.token, {TOKEN_METADATA_KEY: presented} if presented else {})
        if problem:
            return f"worker {service.name}: the step link carried {problem}"
        protocol = hello.get("protocol", PROTOCOL)
        if protocol not in (PROTOCOL, RESULTS):
            return f"worker {service.name}: this port takes step links, not {protocol!r} links"
        if not service.host.loaded:
            return f"worker {service.name}: no layers loaded yet"
        return ""

    def _open(self, upstream: Link, hello: dict[str, object], chain: str) -> Link | None:
        """Check the caller's hello and open the link onwards; answer READY. The link to the next stage
        (None when this stage is last); StepLinkError when the link was refused."""
        service = self.service
        refusal = self._refusal(hello)
        downstream = None
        if not refusal and service.next_stage:
            try:
                address, local = self.next_address()
                if not address:
                    raise StepLinkError(f"the next stage {service.next_stage} takes no step links")
                downstream = dial(address, service.token, service.tls, chain=chain, local=local)
            except (StepLinkError, OSError, TimeoutError) as error:
                refusal = f"worker {service.name}: no step link to the next stage: {error}"
        upstream.send_json(READY, {"error": refusal})
        if refusal:
            raise StepLinkError(refusal)
        return downstream

    def _answer_results(self, link: Link, hello: dict[str, object], chain: str) -> None:
        """A coordinator's link for the results of `chain`, which this stage ends: registered until the
        coordinator closes it (nothing comes the other way)."""
        service = self.service
        refusal = self._refusal(hello)
        if not refusal and service.next_stage:
            refusal = f"worker {service.name}: not the last stage (it sends on to {service.next_stage})"
        elif not refusal and not chain:
            refusal = f"worker {service.name}: a results link names no chain"
        link.send_json(READY, {"error": refusal})
        if refusal:
            raise StepLinkError(refusal)
        link.sock.settimeout(None)
        self._results[chain] = link
        try:
            while link.read() is not None:  # the coordinator sends nothing on it: this waits for its end
                pass
        finally:
            if self._results.get(chain) is link:
                del self._results[chain]


class _Hop:
    """One upstream link of a worker: steps in, run on the compute thread, sent on or answered.

    The compute thread reads the link itself (`compute.watch`): a step that arrives is parsed, computed
    and its output written on by that one thread, with no other thread woken on the way (on a 2-core
    machine a sleeping thread took 0.1–0.2 ms to wake for each hand-off). The thread that accepted the
    link waits for its end; a second one relays the results coming back from the next stage."""

    def __init__(
        self,
        service: StageService,
        upstream: Link,
        downstream: Link | None,
        chain: str = "",
        server: StepLinkServer | None = None,
    ):
        self.service = service
        self.upstream = upstream
        self.downstream = downstream
        self.chain = chain
        self.server = server
        self.ended = threading.Event()

    def run(self) -> None:
        """Serve the link until it ends."""
        if self.downstream is not None:
            threading.Thread(target=self._relay, name="step-relay", daemon=True).start()
        compute.watch(self.upstream.sock, self._readable)
        self.ended.wait()

    def stop(self) -> None:
        """End the link from any thread: the compute thread sees its end and lets `run` return."""
        self.upstream.shutdown()

    def _readable(self) -> None:
        """On the compute thread, whenever the link has bytes: every step they complete, in order."""
        try:
            frames = self.upstream.frames_ready()
            if frames is None:
                self._end()
                return
            for kind, body in frames:
                if kind != STEP:
                    raise OSError(f"an unexpected frame of kind {kind}")
                try:
                    request = pb.StepRequest.FromString(body)
                except DecodeError:
                    self._abort("a step that is not a StepRequest")
                    self._end()
                    return
                self._compute(request)
        except OSError as error:
            log.debug("a step link ended: %s", error)
            self._end()

    def _end(self) -> None:
        """On the compute thread: stop reading the link; `run` returns and its links are closed."""
        compute.unwatch(self.upstream.sock)
        self.ended.set()

    def _compute(self, request: pb.StepRequest) -> None:
        """One step, its output sent on or its answer sent back. OSError: the link up broke."""
        service = self.service
        try:
            output, seconds = service.timed_step(request)
        except Exception as error:
            self.upstream.send(RESULT, service.step_failure(request, error).SerializeToString())
            return
        # Every stage's timing travels down with the step, upstream stages first.
        timings = [*request.timings, pb.StageTiming(stage=service.name, seconds=seconds)]
        if isinstance(output, pb.StepResult):
            output.timings.extend(timings)
            self._answer(output.SerializeToString())
        elif self.downstream is None:
            failure = pb.StepResult(
                step_id=request.step_id, error=f"worker {service.name}: no next stage to send to"
            )
            self.upstream.send(RESULT, failure.SerializeToString())
        else:
            output.timings.extend(timings)
            try:
                self.downstream.send(STEP, output.SerializeToString())
            except OSError as error:
                self._abort(f"the link to the next stage {service.next_stage} broke: {error}")

    def _answer(self, result: bytes) -> None:
        """A result of the last stage: straight to the coordinator where it opened a link for them (a
        relay through every upstream worker wakes a thread in each), else back up the chain."""
        direct = self.server.results_link(self.chain) if self.server is not None else None
        if direct is not None:
            try:
                direct.send(RESULT, result)
                return
            except OSError:  # the coordinator closed it: the way up still leads there
                pass
        self.upstream.send(RESULT, result)

    def _relay(self) -> None:
        """What comes back from the next stage (failures, and results where the last stage answers up
        the chain), passed up as it came."""
        assert self.downstream is not None
        problem = f"the next stage {self.service.next_stage} closed its step link"
        try:
            while True:
                frame = self.downstream.read()
                if frame is None:
                    break
                kind, body = frame
                self.upstream.send(kind, body)
                if kind == ABORT:  # names the stage that failed
                    self.upstream.shutdown()
                    return
        except OSError as error:
            problem = f"the link to the next stage {self.service.next_stage} failed: {error}"
        self._abort(problem)

    def _abort(self, problem: str) -> None:
        try:
            self.upstream.send(ABORT, f"worker {self.service.name}: {problem}".encode())
        except OSError:
            pass
        self.upstream.shutdown()  # the compute thread, reading it, sees its end


# ---- the coordinator's side -----------------------------------------------------------------------


class CoordinatorLink:
    """The coordinator's end of a step link. Steps are written by the thread that has them (the compute
    thread, straight after the local stages: no hand-back to the event loop before the step leaves);
    results are read on the event loop as their bytes arrive, where the steps wait: by the loop's own
    transport over a duplicate of the socket (uvloop reads in C), or, over TLS, by `add_reader` and the
    link's in-memory TLS session."""

    def __init__(self, chain: StepChain, link: Link, loop: asyncio.AbstractEventLoop):
        self.chain = chain
        self.link = link
        self.loop = loop
        self.problem = "ended unexpectedly"
        self.closed = False
        self.delivered = 0  # results read from it
        self._fd = link.sock.fileno()
        self._transport: asyncio.Transport | None = None

    @classmethod
    async def open(cls, chain: StepChain, link: Link) -> CoordinatorLink:
        """Start reading `link` on the running loop."""
        loop = asyncio.get_running_loop()
        self = cls(chain, link, loop)
        if link.tls is None:
            # The transport owns a duplicate: it closes its own descriptor, never the one a write from
            # another thread may still be using (whose number could otherwise be reused meanwhile).
            reader = link.sock.dup()
            try:
                self._transport, _ = await loop.connect_accepted_socket(lambda: _Results(self), sock=reader)
            except BaseException:
                reader.close()
                raise
        else:
            loop.add_reader(self._fd, self._readable)
        return self

    def send(self, body: bytes) -> None:
        """Write one step, from any thread; OSError when the link broke or the stage stopped reading
        within the socket's timeout (the step timeout)."""
        self.link.send(STEP, body)

    def _readable(self) -> None:
        try:
            frames = self.link.frames_ready()
        except OSError as error:
            self._end(f"failed: {error}")
            return
        if frames is None:
            self._end(self.problem)
        else:
            self._take(frames)

    def _take(self, frames: list[tuple[int, bytes]]) -> None:
        """On the event loop: frames as they came, each result delivered to its step."""
        for kind, body in frames:
            if kind == ABORT:
                self._end(f"failed: {body.decode(errors='replace')}")
                return
            try:
                if kind != RESULT:
                    raise DecodeError(f"a frame of kind {kind}")
                result = pb.StepResult.FromString(body)
            except DecodeError as error:
                self._end(f"sent a result that is not a StepResult: {error}")
                return
            self.delivered += 1
            self.chain._deliver(result)

    def close(self) -> None:
        """On the event loop: stop reading and close (a write in flight on another thread fails)."""
        if self.closed:
            return
        self.closed = True
        if self._transport is not None:
            self._transport.abort()
        else:
            self.loop.remove_reader(self._fd)
        self.link.close()

    def _end(self, problem: str) -> None:
        if self.closed:
            return
        self.problem = problem
        self.close()
        self.chain._lost(self)


class _Results(asyncio.Protocol):
    """The loop's reading of a plaintext coordinator link: frames parsed as the bytes come."""

    def __init__(self, link: CoordinatorLink):
        self.link = link
        self._buffer = bytearray()

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        try:
            complete = frames.whole_frames(self._buffer)
        except OSError as error:
            self.link._end(f"sent {error}")
            return
        self.link._take(complete)

    def connection_lost(self, error: Exception | None) -> None:
        self.link._end(f"failed: {error}" if error is not None else self.link.problem)


class StepChain(StepsInFlight):
    """`ForwardChain`'s interface over a step link to the first remote stage, or over gRPC's Forward
    stream where no link can be made. Results are matched to steps by id.

    Over a link, a step may be written from the compute thread (`open_link` and `expect` on the loop,
    `send` there, then `result` on the loop), so that it leaves the moment the local stages are done."""

    def __init__(self, stages: list[StageClient], step_timeout: float):
        super().__init__(stages, step_timeout)
        self._grpc = ForwardChain(stages, step_timeout)
        self._link: CoordinatorLink | None = None
        self._results: CoordinatorLink | None = None  # the last stage's link for results, when it has one
        self._on_grpc = not links_enabled()
        self._open_lock = asyncio.Lock()
        self._warned = ""

    @property
    def linked(self) -> bool:
        """Whether steps go over a step link now (else over gRPC, or nothing is open yet)."""
        return self._link is not None

    async def submit(self, request: PreparedStep) -> StepResult:
        link = await self.open_link()
        if link is None:
            return await self._grpc.submit(request)
        future = self.expect(request.step_id)
        compute.post(self.send, link, request)  # a blocking write: never on the event loop
        return await self.result(request.step_id, future)

    def send(self, link: CoordinatorLink, request: PreparedStep) -> None:
        """On any thread but the event loop's: write one step. A link that broke fails the step (and the
        link, on the loop) with StageLost."""
        try:
            link.send(request.SerializeToString())
        except OSError as error:
            link.loop.call_soon_threadsafe(
                self._broken, link, request.step_id, f"broke: {error or 'timed out'}"
            )

    def fail(self, link: CoordinatorLink, step_id: int, error: Exception) -> None:
        """From any thread: the step failed before it was sent on `link` (a local stage failed)."""
        link.loop.call_soon_threadsafe(self._fail_step, step_id, error)

    def _fail_step(self, step_id: int, error: Exception) -> None:
        future = self._pending.pop(step_id, None)
        if future is not None and not future.done():
            future.set_exception(error)

    def _broken(self, link: CoordinatorLink, step_id: int, problem: str) -> None:
        self._fail_step(step_id, StageLost(f"the step link to {self.first.describe()} {problem}"))
        if self._link is link:
            link._end(problem)

    async def open_link(self) -> CoordinatorLink | None:
        """The link steps go over, opened (and the whole chain behind it linked) if it is not yet; None
        when the chain runs on gRPC."""
        link = self._link
        if link is not None:
            return link
        async with self._open_lock:
            if self._link is None and not self._on_grpc:
                try:
                    self._link = await self._dial()
                except StageError as error:  # the stage does not answer: no transport would do
                    raise StageLost(str(error)) from None
                except StepLinkError as error:
                    self._on_grpc = True
                    if str(error) != self._warned:
                        log.warning("steps go over gRPC's Forward stream (slower): %s", error)
                        self._warned = str(error)
            return self._link

    async def _dial(self) -> CoordinatorLink:
        """The link to the first stage, READY: the whole chain is linked. Where the chain has more than
        one stage, a second link to the last one carries its results straight back."""
        limit = min(OPEN_TIMEOUT, self.step_timeout)  # a cut link must not hold a step longer
        chain = uuid.uuid4().hex
        link = await self._link_to(self.first, limit, chain, PROTOCOL)
        link.sock.settimeout(self.step_timeout)  # a write waits at most this long for the stage to read
        if len(self.stages) > 1:
            try:
                results = await self._link_to(self.stages[-1], limit, chain, RESULTS)
                self._results = await CoordinatorLink.open(self, results)
            except (StepLinkError, StageError) as error:  # they come back up the chain instead
                log.info("the last stage's results come back through every stage: %s", error)
        return await CoordinatorLink.open(self, link)

    async def _link_to(self, stage: StageClient, limit: float, chain: str, protocol: str) -> Link:
        info = await stage.info(timeout=limit)
        if not info.step_port:
            raise StepLinkError(
                f"{stage.describe()} takes no step links (an older meshllm, or --step-port off)"
            )
        host, _ = split_address(stage.address)
        address = frames.join_address(host, info.step_port)
        local = info.step_socket
        return await asyncio.to_thread(dial, address, stage.token, stage.tls, limit, chain, protocol, local)

    def _lost(self, link: CoordinatorLink) -> None:
        lost: CoordinatorLink | None
        if link is self._results and self._link is not None:
            stage, lost = self.stages[-1], self._link
        elif link is self._link:
            stage, lost = self.first, self._results
        else:
            return  # a link closed on purpose: its steps were failed then
        self._link = self._results = None
        if lost is not None:
            lost.close()
        self._fail_all(StageLost(f"the step link to {stage.describe()} {link.problem}"))

    async def reset(self) -> None:
        """Close the link (and the gRPC stream); in-flight steps fail, the next step opens a new one."""
        links, self._link, self._results = (self._link, self._results), None, None
        for link in links:
            if link is not None:
                link.close()
        self._fail_all(StageLost("the pipeline was reset"))
        await self._grpc.reset()
        self._on_grpc = not links_enabled()


Chain = ForwardChain | StepChain  # what a pipeline sends its steps to
