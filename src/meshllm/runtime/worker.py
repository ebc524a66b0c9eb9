"""The stage worker: a gRPC server that loads a layer range when asked and serves steps.

A worker that is not last opens a Forward stream to the next stage for every Forward stream it serves,
relays its output there, and passes the sampled tokens that come back up to its own caller.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc

from meshllm.devices import describe_host
from meshllm.engines import default_engine, guess_device_type, load_stage
from meshllm.engines.base import Stage
from meshllm.models.checkpoint import Checkpoint
from meshllm.runtime.sampling import Sampler
from meshllm.step import StepResult
from meshllm.transport.codec import decode_step, encode_result, forward_step
from meshllm.transport.proto import meshllm_pb2 as pb
from meshllm.transport.proto import meshllm_pb2_grpc as pbg
from meshllm.transport.rpc import (
    CHANNEL_OPTIONS,
    PROTOCOL_VERSION,
    SERVER_OPTIONS,
    VERSION,
    token_metadata,
    token_problem,
)

log = logging.getLogger(__name__)

_END = object()


class StageService(pbg.StageServicer):
    def __init__(
        self, name: str, token: str | None = None, engine: str | None = None, device: str | None = None
    ):
        self.name = name
        self.token = token
        self.engine = engine or default_engine()
        self.device = device
        self.stage: Stage | None = None
        self.sampler = Sampler()
        self.model = ""
        self.num_layers = 0
        self.next_stage = ""
        self._next_channel: grpc.aio.Channel | None = None
        # One thread runs every forward pass and cache change, in arrival order; the event loop only moves bytes.
        self.compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compute")
        self._load_lock = asyncio.Lock()

    async def _authorize(self, context: grpc.aio.ServicerContext) -> None:
        if not self.token:
            return
        problem = token_problem(self.token, dict(context.invocation_metadata() or ()))
        if problem:
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED, f"worker {self.name}: the call carried {problem}"
            )

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.compute, fn, *args)

    async def Info(self, request: pb.InfoRequest, context: grpc.aio.ServicerContext) -> pb.InfoReply:
        await self._authorize(context)
        stage = self.stage
        device_type = getattr(stage, "device_type", None) or guess_device_type(self.engine, self.device)
        info = describe_host(device_type)
        return pb.InfoReply(
            hostname=info.hostname,
            engine=self.engine,
            device_type=device_type,
            device_name=info.device_name,
            memory_total=info.memory_total,
            memory_available=info.memory_available,
            model=self.model,
            layer_start=stage.layer_range[0] if stage else 0,
            layer_end=stage.layer_range[1] if stage else 0,
            num_layers=self.num_layers,
            live_sequences=stage.live_sequences() if stage else 0,
            version=VERSION,
            protocol_version=PROTOCOL_VERSION,
            weight_bytes=stage.weight_bytes() if stage else 0,
        )

    async def Health(self, request: pb.HealthRequest, context: grpc.aio.ServicerContext) -> pb.HealthReply:
        await self._authorize(context)
        stage = self.stage
        loaded = stage is not None
        message = (
            f"layers [{stage.layer_range[0]}, {stage.layer_range[1]})"
            if stage is not None
            else "waiting for Load"
        )
        return pb.HealthReply(ok=True, loaded=loaded, model=self.model, message=message)

    async def Load(self, request: pb.LoadRequest, context: grpc.aio.ServicerContext):
        await self._authorize(context)
        layer_range = (request.layer_start, request.layer_end)
        engine = request.engine or self.engine
        async with self._load_lock:
            yield pb.LoadProgress(
                fraction=0.0,
                message=f"loading layers [{layer_range[0]}, {layer_range[1]}) of {request.model}",
            )
            started = time.perf_counter()
            loop = asyncio.get_running_loop()
            fractions: asyncio.Queue[float] = asyncio.Queue()

            def report(fraction: float) -> None:  # called on the compute thread
                loop.call_soon_threadsafe(fractions.put_nowait, fraction)

            def load() -> Stage:
                checkpoint = Checkpoint.open(request.model)
                self.num_layers = checkpoint.config.num_hidden_layers
                dtype = request.dtype or "float32"
                return load_stage(
                    engine, checkpoint, layer_range, dtype=dtype, device=self.device, progress=report
                )

            self.stage = None  # free the old range before reading the new one
            loading = asyncio.ensure_future(self._run(load))
            reported = 0.0
            while not loading.done():
                waiter = asyncio.ensure_future(fractions.get())
                await asyncio.wait([loading, waiter], return_when=asyncio.FIRST_COMPLETED)
                if not waiter.done():
                    waiter.cancel()
                    continue
                fraction = waiter.result()
                if fraction >= reported + 0.1 or fraction >= 1.0:  # at most about ten messages
                    reported = fraction
                    yield pb.LoadProgress(
                        fraction=fraction, message=f"{fraction:.0%} of the layers' tensors read"
                    )
            try:
                stage = loading.result()
            except Exception as error:  # any failure goes back to the coordinator, named
                log.exception("load failed")
                yield pb.LoadProgress(error=f"worker {self.name}: {error}", done=True)
                return
            self.stage, self.engine = stage, engine
            self.model = request.model
            self.sampler = Sampler()
            if self._next_channel is not None:
                await self._next_channel.close()
                self._next_channel = None
            self.next_stage = request.next_stage
            if request.next_stage:
                self._next_channel = grpc.aio.insecure_channel(request.next_stage, options=CHANNEL_OPTIONS)
            log.info(
                "loaded layers [%d, %d) in %.1f s; next stage: %s",
                *layer_range,
                time.perf_counter() - started,
                request.next_stage or "none (last)",
            )
            yield pb.LoadProgress(fraction=1.0, message="loaded", done=True)

    async def Release(self, request: pb.ReleaseRequest, context: grpc.aio.ServicerContext) -> pb.ReleaseReply:
        await self._authorize(context)
        stage = self.stage
        if stage is None:
            return pb.ReleaseReply(live_sequences=0)
        seq_ids = list(request.seq_ids)

        def release() -> int:
            stage.release(seq_ids)
            self.sampler.release(seq_ids)
            return stage.live_sequences()

        return pb.ReleaseReply(live_sequences=await self._run(release))

    def _step(self, stage: Stage, request: pb.StepRequest) -> pb.StepRequest | pb.StepResult:
        """Run one step on the compute thread: the request for the next stage, or the sampled tokens."""
        output = stage.forward(decode_step(request, stage.engine))
        if stage.is_last:
            assert output.logits is not None  # a last stage returns logits
            return encode_result(
                StepResult(request.step_id, self.sampler.sample(output.segments, output.logits))
            )
        return forward_step(request, output.hidden_states)

    async def Forward(self, request_iterator, context: grpc.aio.ServicerContext):
        await self._authorize(context)
        stage = self.stage
        if stage is None:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, f"worker {self.name}: no layers loaded yet"
            )
        assert stage is not None  # abort raised otherwise
        results: asyncio.Queue = asyncio.Queue()
        timings: dict[int, pb.StageTiming] = {}  # steps sent downstream -> this stage's compute time
        downstream = None
        if not stage.is_last:
            stub = pbg.StageStub(self._next_channel)
            downstream = stub.Forward(metadata=token_metadata(self.token))

        async def consume() -> None:
            try:
                async for request in request_iterator:
                    started = time.perf_counter()
                    try:
                        output = await self._run(self._step, stage, request)
                    except Exception as error:
                        log.exception("step %d failed", request.step_id)
                        await results.put(
                            pb.StepResult(step_id=request.step_id, error=f"worker {self.name}: {error}")
                        )
                        continue
                    timing = pb.StageTiming(stage=self.name, seconds=time.perf_counter() - started)
                    if downstream is None:
                        output.timings.append(timing)
                        await results.put(output)
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
                await results.put(ConnectionError(f"next stage {self.next_stage} failed: {error.details()}"))

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


async def serve_worker(
    host: str,
    port: int,
    name: str,
    token: str | None = None,
    engine: str | None = None,
    device: str | None = None,
) -> None:
    """Run a worker until cancelled or signalled."""
    server = grpc.aio.server(options=SERVER_OPTIONS)
    service = StageService(name, token=token, engine=engine, device=device)
    pbg.add_StageServicer_to_server(service, server)
    address = f"{host}:{port}"
    try:
        server.add_insecure_port(address)
    except RuntimeError as error:
        raise OSError(f"cannot listen on {address}: {error} (is the port in use?)") from None
    await server.start()
    log.info(
        "meshllm worker %s listening on %s (engine %s, version %s)", name, address, service.engine, VERSION
    )
    try:
        await server.wait_for_termination()
    finally:
        await server.stop(grace=1.0)
        service.compute.shutdown(wait=False, cancel_futures=True)
