"""The coordinator's side of the stage protocol: calls to one stage, and the Forward chain.

`StageClient` makes the unary calls (Info, Health, Release) and Load; `ForwardChain` keeps one
long-lived Forward stream to the first remote stage and matches the results that come back to their
steps. Every failure is a `StageError` or `PipelineError` whose message names the device and the fix.
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
from collections.abc import Callable

import grpc

from meshllm.devices import LayerShape, Link, Precision, StageInfo
from meshllm.errors import StageError
from meshllm.step import PipelineError, StageLost, StepInput, StepResult
from meshllm.transport.codec import decode_info, decode_result, encode_layer_shape, encode_step
from meshllm.transport.proto import meshllm_pb2 as pb
from meshllm.transport.proto import meshllm_pb2_grpc as pbg
from meshllm.transport.rpc import channel, explain, is_refusal, token_metadata
from meshllm.transport.stage import Health, LoadSpec, LoadUpdate
from meshllm.transport.tls import TlsFiles

log = logging.getLogger(__name__)


class TokenRefused(StageError):
    """The stage answered, but refused the cluster token."""


# A step encoded for the wire (done on the caller's compute thread, off the event loop).
PreparedStep = pb.StepRequest


def prepare_step(step: StepInput) -> PreparedStep:
    return encode_step(step)


LINK_ROUNDS = 20
LINK_PAYLOAD = 1 << 20  # bytes a bandwidth transfer sends: well above what one step's activations take


async def time_link(client: StageClient, rounds: int, payload_bytes: int) -> Link:
    """Time `client`'s link: `rounds` empty calls (the median), then three one-way transfers."""
    await client.echo()  # the channel connects here, not in the first timed round
    trips = []
    for _ in range(max(rounds, 1)):
        started = time.perf_counter()
        await client.echo()
        trips.append(time.perf_counter() - started)
    round_trip = statistics.median(trips)
    payload, transfers = bytes(max(payload_bytes, 1)), []
    for _ in range(3):
        started = time.perf_counter()
        await client.echo(payload)
        transfers.append(time.perf_counter() - started)
    moving = max(statistics.median(transfers) - round_trip, 1e-9)
    return Link(round_trip, len(payload) / moving)


class StageClient:
    """One remote stage, by name and address, on one channel (mutual TLS with `tls`, plaintext
    without); every call carries the cluster token."""

    def __init__(self, name: str, address: str, token: str | None, tls: TlsFiles | None = None):
        self.name = name
        self.address = address
        self.secure = tls is not None
        self.token = token
        self.tls = tls
        self._metadata = token_metadata(token)
        self.channel = channel(address, tls)
        self._stub = pbg.StageStub(self.channel)  # type: ignore[no-untyped-call]

    def describe(self) -> str:
        return f"device '{self.name}' ({self.address})"

    def _error(self, error: grpc.RpcError) -> StageError:
        kind = TokenRefused if is_refusal(error) else StageError
        return kind(explain(error, self.name, self.address, self.secure))

    async def info(
        self,
        timeout: float = 3.0,
        calibrate: Precision | None = None,
        volume: int = 0,
        layer: LayerShape | None = None,
    ) -> StageInfo:
        """What the stage has; with `calibrate`, also its speeds (`Calibration`) at that precision, the
        read speed over about `volume` bytes of weights, and with `layer` what a layer of that shape takes."""
        request = pb.InfoRequest()
        if calibrate is not None:
            request = pb.InfoRequest(
                dtype=calibrate.dtype,
                quantize=calibrate.quantize or "",
                group_size=calibrate.group_size,
                volume=volume,
                layer=encode_layer_shape(layer) if layer is not None else None,
            )
        try:
            reply = await self._stub.Info(request, metadata=self._metadata, timeout=timeout)
        except grpc.aio.AioRpcError as error:
            raise self._error(error) from None
        return decode_info(reply)

    async def echo(self, payload: bytes = b"", echo_payload: bool = False, timeout: float = 30.0) -> None:
        request = pb.EchoRequest(payload=payload, echo_payload=echo_payload)
        try:
            await self._stub.Echo(request, metadata=self._metadata, timeout=timeout)
        except grpc.aio.AioRpcError as error:
            raise self._error(error) from None

    async def measure_link(self, rounds: int = LINK_ROUNDS, payload_bytes: int = LINK_PAYLOAD) -> Link:
        """This process's link to the stage: the median empty round trip, and one-way bandwidth."""
        return await time_link(self, rounds, payload_bytes)

    async def probe(
        self,
        address: str,
        rounds: int = LINK_ROUNDS,
        payload_bytes: int = LINK_PAYLOAD,
        timeout: float = 60.0,
    ) -> Link:
        """The stage's own link to the stage at `address` (the next one in a chain), measured there."""
        request = pb.ProbeRequest(address=address, rounds=rounds, payload_bytes=payload_bytes)
        try:
            reply = await self._stub.Probe(request, metadata=self._metadata, timeout=timeout)
        except grpc.aio.AioRpcError as error:
            raise self._error(error) from None
        if reply.error:
            raise StageError(reply.error)
        return Link(reply.round_trip, reply.bandwidth)

    async def health(self, timeout: float = 1.0) -> Health:
        try:
            reply = await self._stub.Health(pb.HealthRequest(), metadata=self._metadata, timeout=timeout)
        except grpc.aio.AioRpcError as error:
            raise self._error(error) from None
        return Health(model=reply.model, message=reply.message)

    async def load(self, spec: LoadSpec, next_stage: str, on_progress: Callable[[LoadUpdate], None]) -> str:
        """Load `spec` there; `next_stage` is the address its output goes to ("" when it is last).
        Returns the stage's line on what the load took."""
        request = pb.LoadRequest(
            model=spec.model,
            layer_start=spec.layer_range.start,
            layer_end=spec.layer_range.end,
            dtype=spec.dtype,
            next_stage=next_stage,
            engine=spec.engine or "",
            quantize=spec.quantize or "",
            group_size=spec.group_size,
            weights_from=spec.weights.address if spec.weights else "",
            weights_key=spec.weights.key if spec.weights else "",
        )
        summary = ""
        try:
            async for progress in self._stub.Load(request, metadata=self._metadata):
                if progress.error:
                    raise StageError(f"{self.describe()} failed to load: {progress.error}")
                update = LoadUpdate(
                    message=progress.message,
                    phase=progress.phase or "load",
                    fraction=progress.fraction,
                    bytes_done=progress.bytes_done,
                    bytes_total=progress.bytes_total,
                    done=progress.done,
                )
                on_progress(update)
                if progress.done:
                    summary = progress.message
        except grpc.aio.AioRpcError as error:
            raise self._error(error) from None
        return summary

    async def release(self, seq_ids: list[int], timeout: float = 5.0) -> int:
        """Drop these sequences' caches there; returns the sequences still live on it."""
        try:
            reply = await self._stub.Release(
                pb.ReleaseRequest(seq_ids=seq_ids), metadata=self._metadata, timeout=timeout
            )
        except grpc.aio.AioRpcError as error:
            raise self._error(error) from None
        return int(reply.live_sequences)

    def open_forward(self) -> grpc.aio.StreamStreamCall:
        return self._stub.Forward(metadata=self._metadata)

    async def close(self) -> None:
        await self.channel.close()


class StepsInFlight:
    """What every chain of remote stages shares: the steps sent and not yet answered, by id, each
    waiting for its result within the step timeout. A chain sends and reads; `reset` is its own."""

    def __init__(self, stages: list[StageClient], step_timeout: float):
        self.stages = stages
        self.step_timeout = step_timeout
        self._pending: dict[int, asyncio.Future[StepResult]] = {}

    @property
    def first(self) -> StageClient:
        return self.stages[0]

    def expect(self, step_id: int) -> asyncio.Future[StepResult]:
        """On the event loop, before the step is sent: the future its result will complete."""
        future: asyncio.Future[StepResult] = asyncio.get_running_loop().create_future()
        self._pending[step_id] = future
        return future

    def _deliver(self, result: pb.StepResult) -> None:
        future = self._pending.pop(result.step_id, None)
        if future is None or future.done():
            return
        if result.error:
            future.set_exception(PipelineError(result.error))
        else:
            future.set_result(decode_result(result))

    def _fail_all(self, error: Exception) -> None:
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(error)

    async def result(self, step_id: int, future: asyncio.Future[StepResult]) -> StepResult:
        """The step's result, within the step timeout."""
        # A timer on the future itself, not `asyncio.wait_for`: that wraps it in a second future, one
        # more turn of the event loop between the result's arrival and the step going on.
        timer = asyncio.get_running_loop().call_later(self.step_timeout, _time_out, future)
        try:
            return await future
        except _StepTimeout:
            self._pending.pop(step_id, None)
            lost = StageLost(
                f"step timed out after {self.step_timeout:g} s in the chain from {self.first.describe()}"
            )
            self._fail_all(lost)  # the steps behind it are stuck on the same link: they say so too
            await self.reset()
            raise lost from None
        finally:
            timer.cancel()

    async def reset(self) -> None:
        raise NotImplementedError


class _StepTimeout(Exception):
    """A step's result did not come within the step timeout."""


def _time_out(future: asyncio.Future[StepResult]) -> None:
    if not future.done():
        future.set_exception(_StepTimeout())


class ForwardChain(StepsInFlight):
    """One long-lived Forward stream to the first remote stage; results are matched to steps by id."""

    def __init__(self, stages: list[StageClient], step_timeout: float):
        super().__init__(stages, step_timeout)
        self._call: grpc.aio.StreamStreamCall | None = None
        self._reader: asyncio.Task[None] | None = None
        self._open_lock = asyncio.Lock()
        self._write_lock = asyncio.Lock()  # a gRPC stream takes one write at a time

    async def _ensure_open(self) -> grpc.aio.StreamStreamCall:
        async with self._open_lock:
            if self._call is None:
                self._call = self.first.open_forward()
                self._reader = asyncio.create_task(self._read(self._call))
            return self._call

    async def _read(self, call: grpc.aio.StreamStreamCall) -> None:
        try:
            async for result in call:
                self._deliver(result)
            self._fail_all(StageLost(f"the stream to {self.first.describe()} ended unexpectedly"))
        except grpc.aio.AioRpcError as error:
            self._fail_all(StageLost(self._explain(error)))
        except asyncio.CancelledError:
            self._fail_all(StageLost("the pipeline was reset"))
        finally:
            if self._call is call:
                self._call = None

    def _explain(self, error: grpc.aio.AioRpcError) -> str:
        details = error.details() or error.code().name
        if (
            error.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNAVAILABLE)
            and "worker " not in details
        ):
            return explain(error, self.first.name, self.first.address, self.first.secure)
        return f"stage failure ({error.code().name}): {details}"  # a stage further down, named in details

    async def submit(self, request: PreparedStep) -> StepResult:
        call = await self._ensure_open()
        future = self.expect(request.step_id)
        try:
            async with self._write_lock:
                await call.write(request)
        except Exception as error:  # the stream broke: AioRpcError, or "RPC already finished"
            self._pending.pop(request.step_id, None)
            if future.done() and not future.cancelled():
                future.exception()  # the reader failed it already; the error raised below tells it
            if self._call is call:
                await self.reset()  # the next step opens a new stream
            details = self._explain(error) if isinstance(error, grpc.aio.AioRpcError) else str(error)
            raise StageLost(f"the stream to {self.first.describe()} broke: {details}") from None
        return await self.result(request.step_id, future)

    async def reset(self) -> None:
        """Close the stream; in-flight steps fail, the next step opens a new one."""
        call, self._call = self._call, None
        if call is not None:
            call.cancel()
        if self._reader is not None:
            self._reader.cancel()
            self._reader = None
        self._fail_all(StageLost("the pipeline was reset"))
