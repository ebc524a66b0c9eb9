"""The stage service: a `StageHost` served over gRPC (Info, Load, Forward, Release, Health).

A stage that is not last opens a Forward stream to the next stage for every Forward stream it serves,
relays its output there, and passes the sampled tokens that come back up to its own caller. Every forward
pass and cache change runs on the process's compute thread (`meshllm.compute`), in arrival order; the
event loop only moves bytes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc

from meshllm import compute
from meshllm.defaults import DEFAULT_GROUP_SIZE
from meshllm.devices import Precision
from meshllm.errors import StageError
from meshllm.step import LayerRange, MalformedStep, StepResult
from meshllm.transport.codec import (
    decode_layer_shape,
    decode_step,
    encode_calibration,
    encode_info,
    encode_result,
    forward_step,
)
from meshllm.transport.proto import meshllm_pb2 as pb
from meshllm.transport.proto import meshllm_pb2_grpc as pbg
from meshllm.transport.rpc import (
    SERVER_OPTIONS,
    VERSION,
    channel,
    handshake_problem,
    token_metadata,
    token_problem,
)
from meshllm.transport.stage import LoadSpec, StageHost, WeightsFrom
from meshllm.transport.stage_client import StageClient, time_link
from meshllm.transport.step_link import StepLinkError, StepLinkServer
from meshllm.transport.tls import TlsFiles, add_port

log = logging.getLogger(__name__)

_END = object()


class StageService(pbg.StageServicer):
    def __init__(self, host: StageHost, token: str | None = None, tls: TlsFiles | None = None):
        self.host = host
        self.name = host.name
        self.token = token
        self.tls = tls  # this device's certificates: the next stage is dialled with them too
        self.next_stage = ""  # "host:port" of the next stage; empty when this one is last
        self._next_channel: grpc.aio.Channel | None = None
        self.step_port = 0  # where step links are taken (0: none)
        self.step_socket = ""  # the local socket taking them from this machine ("": none)
        self._load_lock = asyncio.Lock()

    async def _authorize(self, context: grpc.aio.ServicerContext) -> None:
        problem = token_problem(self.token, dict(context.invocation_metadata() or ()))
        if problem:
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED, f"worker {self.name}: the call carried {problem}"
            )

    async def Info(self, request: pb.InfoRequest, context: grpc.aio.ServicerContext) -> pb.InfoReply:
        await self._authorize(context)
        reply = encode_info(self.host.info())
        reply.step_port = self.step_port
        reply.step_socket = self.step_socket
        if request.dtype:  # a short measurement: on the compute thread, never on the event loop
            quantize, group_size = request.quantize or None, request.group_size or DEFAULT_GROUP_SIZE
            precision = Precision(request.dtype, quantize, group_size)
            try:
                layer = decode_layer_shape(request.layer) if request.HasField("layer") else None
            except ValueError as error:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"worker {self.name}: {error}")
            calibration = await compute.run_async(self.host.calibrate, precision, request.volume, layer)
            encode_calibration(reply, calibration)
        return reply

    async def Health(self, request: pb.HealthRequest, context: grpc.aio.ServicerContext) -> pb.HealthReply:
        await self._authorize(context)
        health = self.host.health()
        return pb.HealthReply(model=health.model, message=health.message)

    async def Load(
        self, request: pb.LoadRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.LoadProgress]:
        await self._authorize(context)
        layer_range = LayerRange(request.layer_start, request.layer_end)  # checked by the host's engine
        weights = WeightsFrom(request.weights_from, request.weights_key) if request.weights_from else None
        spec = LoadSpec(
            request.model,
            layer_range,
            request.dtype or "float32",
            request.engine or None,
            request.quantize or None,
            request.group_size or DEFAULT_GROUP_SIZE,
            weights,
        )
        async with self._load_lock:
            source = f"weights from {weights.address}" if weights else spec.model
            yield pb.LoadProgress(fraction=0.0, message=f"loading layers {layer_range} of {source}")
            started = time.perf_counter()
            loop = asyncio.get_running_loop()
            updates: asyncio.Queue[pb.LoadProgress] = asyncio.Queue()

            def report(fraction: float) -> None:  # called on the compute thread
                update = pb.LoadProgress(
                    phase="load", fraction=fraction, message=f"{fraction:.0%} of the layers' tensors read"
                )
                loop.call_soon_threadsafe(updates.put_nowait, update)

            def received(done: int, total: int) -> None:  # called on the compute thread
                update = pb.LoadProgress(
                    phase="fetch",
                    fraction=done / total if total else 1.0,
                    bytes_done=done,
                    bytes_total=total,
                    message=f"{done / 1e6:.1f} of {total / 1e6:.1f} MB of weights received",
                )
                loop.call_soon_threadsafe(updates.put_nowait, update)

            loading = asyncio.ensure_future(compute.run_async(self.host.load, spec, report, received))
            shown = _Throttle()
            while not loading.done():
                waiter = asyncio.ensure_future(updates.get())
                await asyncio.wait([loading, waiter], return_when=asyncio.FIRST_COMPLETED)
                if not waiter.done():
                    waiter.cancel()
                    continue
                update = waiter.result()
                if shown.due(update):
                    yield update
            try:
                summary = loading.result()
            except Exception as error:  # any failure goes back to the coordinator, named
                log.exception("load failed")
                yield pb.LoadProgress(error=f"worker {self.name}: {error}", done=True)
                return
            if self._next_channel is not None:
                await self._next_channel.close()
                self._next_channel = None
            self.next_stage = request.next_stage
            if request.next_stage:
                self._next_channel = channel(request.next_stage, self.tls)
            log.info(
                "loaded layers %s in %.1f s; next stage: %s",
                layer_range,
                time.perf_counter() - started,
                request.next_stage or "none (last)",
            )
            yield pb.LoadProgress(fraction=1.0, message=summary or "loaded", done=True)

    async def Echo(self, request: pb.EchoRequest, context: grpc.aio.ServicerContext) -> pb.EchoReply:
        await self._authorize(context)
        return pb.EchoReply(payload=request.payload if request.echo_payload else b"")

    async def Probe(self, request: pb.ProbeRequest, context: grpc.aio.ServicerContext) -> pb.ProbeReply:
        """Time this stage's link to another (it calls Echo there, with this cluster's token)."""
        await self._authorize(context)
        other = StageClient(request.address, request.address, self.token, self.tls)
        try:
            link = await time_link(other, request.rounds, request.payload_bytes)
        except StageError as error:
            return pb.ProbeReply(error=f"worker {self.name} to {request.address}: {error}")
        finally:
            await other.close()
        return pb.ProbeReply(round_trip=link.round_trip, bandwidth=link.bandwidth)

    async def Release(self, request: pb.ReleaseRequest, context: grpc.aio.ServicerContext) -> pb.ReleaseReply:
        await self._authorize(context)
        live = await compute.run_async(self.host.release, list(request.seq_ids))
        return pb.ReleaseReply(live_sequences=live)

    def _step(self, request: pb.StepRequest) -> pb.StepRequest | pb.StepResult:
        """Run one step on the compute thread: the request for the next stage, or the sampled tokens."""
        outcome = self.host.step(decode_step(request, self.host.framework))
        if outcome.tokens is not None:
            return encode_result(StepResult(request.step_id, outcome.tokens))
        return forward_step(request, outcome.hidden_states)

    def timed_step(self, request: pb.StepRequest) -> tuple[pb.StepRequest | pb.StepResult, float]:
        """`_step`, and the seconds it took on the compute thread: what the step's timing reports, so
        the hand-offs to and from that thread count as the transport's, not the stage's."""
        started = time.perf_counter()
        output = self._step(request)
        return output, time.perf_counter() - started

    def step_failure(self, request: pb.StepRequest, error: Exception) -> pb.StepResult:
        """The answer to a step that failed, naming this worker (logged: a traceback unless the step
        was malformed, which is refused before any cache changed)."""
        if isinstance(error, MalformedStep):
            named = str(error)
            if not named.startswith(f"worker {self.name}:"):
                named = f"worker {self.name}: {named}"
            log.warning("refused a malformed step: %s", named)
            return pb.StepResult(step_id=request.step_id, error=named)
        log.error("step %d failed", request.step_id, exc_info=error)
        return pb.StepResult(step_id=request.step_id, error=f"worker {self.name}: {error}")

    async def next_step_address(self) -> tuple[str, str]:
        """Where the next stage takes step links ("" when it takes none), and the name of its local
        socket for them ("" when it has none)."""
        if self._next_channel is None:
            return "", ""
        stub = pbg.StageStub(self._next_channel)  # type: ignore[no-untyped-call]
        try:
            reply = await stub.Info(pb.InfoRequest(), metadata=token_metadata(self.token), timeout=5.0)
        except grpc.aio.AioRpcError as error:
            details = error.details() or error.code().name
            raise StepLinkError(f"the next stage {self.next_stage} does not answer: {details}") from None
        if not reply.step_port:
            return "", ""
        host = self.next_stage.rpartition(":")[0]
        return f"{host}:{reply.step_port}", reply.step_socket

    async def Forward(
        self, request_iterator: AsyncIterator[pb.StepRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StepResult]:
        await self._authorize(context)
        if not self.host.loaded:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, f"worker {self.name}: no layers loaded yet"
            )
        results: asyncio.Queue[Any] = asyncio.Queue()
        timings: dict[int, pb.StageTiming] = {}  # steps sent downstream -> this stage's compute time
        downstream = None
        if self._next_channel is not None:
            downstream = pbg.StageStub(self._next_channel).Forward(metadata=token_metadata(self.token))

        async def consume() -> None:
            try:
                async for request in request_iterator:
                    try:
                        output, seconds = await compute.run_async(self.timed_step, request)
                    except Exception as error:
                        await results.put(self.step_failure(request, error))
                        continue
                    timing = pb.StageTiming(stage=self.name, seconds=seconds)
                    if isinstance(output, pb.StepResult):
                        output.timings.insert(0, timing)
                        await results.put(output)
                    elif downstream is None:
                        await results.put(
                            pb.StepResult(
                                step_id=request.step_id, error=f"worker {self.name}: no next stage to send to"
                            )
                        )
                    else:
                        timings[request.step_id] = timing
                        await downstream.write(output)
                if downstream is not None:
                    await downstream.done_writing()
                else:
                    await results.put(_END)
            except Exception as error:
                await results.put(error)

        async def relay() -> None:
            assert downstream is not None  # relayed only when there is a next stage
            try:
                async for result in downstream:
                    timing = timings.pop(result.step_id, None)
                    if timing is not None:
                        result.timings.insert(0, timing)  # upstream stages first
                    await results.put(result)
                await results.put(_END)
            except grpc.aio.AioRpcError as error:
                details = error.details() or error.code().name
                problem = handshake_problem(details, secure=self.tls is not None)
                what = problem or f"failed: {details}"
                await results.put(ConnectionError(f"next stage {self.next_stage} {what}"))

        tasks = [asyncio.create_task(consume())]
        if downstream is not None:
            tasks.append(asyncio.create_task(relay()))
        try:
            while True:
                item = await results.get()
                if item is _END:
                    return
                if isinstance(item, Exception):
                    await context.abort(grpc.StatusCode.UNAVAILABLE, f"worker {self.name}: {item}")
                yield item
        finally:
            for task in tasks:
                task.cancel()
            if downstream is not None:
                downstream.cancel()

    async def close(self) -> None:
        if self._next_channel is not None:
            await self._next_channel.close()
        self.host.close()


class _Throttle:
    """Lets through the first and last update of each phase, and others at most every 0.2 s."""

    def __init__(self, interval: float = 0.2):
        self.interval = interval
        self.last: dict[str, float] = {}

    def due(self, update: pb.LoadProgress) -> bool:
        now = time.monotonic()
        previous = self.last.get(update.phase)
        if previous is not None and now - previous < self.interval and update.fraction < 1.0:
            return False
        self.last[update.phase] = now
        return True


async def serve_stage(
    host: StageHost,
    address: str,
    token: str | None = None,
    tls: TlsFiles | None = None,
    step_port: int | None = 0,
) -> None:
    """Serve `host` on `address` ("host:port") until cancelled: mutual TLS with `tls` (callers need a
    certificate of the same CA), plaintext without. Step links are taken on `step_port` of the same
    host (0: any free port; None: none), with the same TLS. OSError when a port cannot be bound."""
    server = grpc.aio.server(options=SERVER_OPTIONS)
    service = StageService(host, token=token, tls=tls)
    pbg.add_StageServicer_to_server(service, server)  # type: ignore[no-untyped-call]
    try:
        add_port(server, address, tls)
    except OSError as error:
        raise OSError(f"cannot listen on {address}: {error} (is the port in use?)") from None
    links = None
    if step_port is not None:
        loop = asyncio.get_running_loop()

        def next_address() -> tuple[str, str]:  # on a link's thread
            return asyncio.run_coroutine_threadsafe(service.next_step_address(), loop).result(timeout=10.0)

        links = StepLinkServer(service, next_address)
        listen_host = address.rpartition(":")[0].strip("[]")
        try:
            service.step_port = links.start(listen_host, step_port)
            service.step_socket = links.local
        except OSError as error:
            raise OSError(
                f"cannot take step links on {listen_host}:{step_port}: {error} (is the port in use?)"
            ) from None
    await server.start()
    log.info(
        "meshllm worker %s listening on %s (engine %s, version %s, %s%s)",
        host.name,
        address,
        host.engine,
        VERSION,
        "mutual TLS" if tls else "plaintext",
        f"; step links on port {service.step_port}{' and a local socket' if service.step_socket else ''}"
        if service.step_port
        else "",
    )
    try:
        await server.wait_for_termination()
    finally:
        if links is not None:
            links.close()
        await server.stop(grace=1.0)
        await service.close()
