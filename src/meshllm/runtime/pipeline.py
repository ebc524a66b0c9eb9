"""The chain of stages as the coordinator drives it: its own stages in-process, then remote workers.

`Pipeline.run_step` takes a step of token ids and returns the tokens the last stage sampled. Several
steps may be in flight at once; each stage processes them in order, one at a time.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc

from meshllm.engines.base import Stage
from meshllm.runtime.sampling import Sampler
from meshllm.step import PipelineError, SampledToken, StepInput
from meshllm.transport.codec import decode_result, encode_step
from meshllm.transport.proto import meshllm_pb2 as pb
from meshllm.transport.proto import meshllm_pb2_grpc as pbg
from meshllm.transport.rpc import token_metadata

log = logging.getLogger(__name__)

StepListener = Callable[[str, float], None]


@dataclass
class RemoteStage:
    name: str
    address: str
    channel: grpc.aio.Channel

    @property
    def stub(self) -> pbg.StageStub:
        return pbg.StageStub(self.channel)


class RemoteChain:
    """One long-lived Forward stream to the first remote stage; results are matched to steps by id."""

    def __init__(self, stages: list[RemoteStage], token: str | None, step_timeout: float):
        self.stages = stages
        self.token = token
        self.step_timeout = step_timeout
        self._call = None
        self._reader: asyncio.Task | None = None
        self._pending: dict[int, asyncio.Future] = {}
        self._open_lock = asyncio.Lock()
        self._write_lock = asyncio.Lock()  # a gRPC stream takes one write at a time

    async def _ensure_open(self):
        async with self._open_lock:
            if self._call is None:
                self._call = self.stages[0].stub.Forward(metadata=token_metadata(self.token))
                self._reader = asyncio.create_task(self._read(self._call))
            return self._call

    async def _read(self, call) -> None:
        try:
            async for result in call:
                future = self._pending.pop(result.step_id, None)
                if future is None or future.done():
                    continue
                if result.error:
                    future.set_exception(PipelineError(result.error))
                else:
                    future.set_result(result)
            self._fail_all(PipelineError(f"the stream to {self.describe(0)} ended unexpectedly"))
        except grpc.aio.AioRpcError as error:
            self._fail_all(PipelineError(self.explain(error)))
        except asyncio.CancelledError:
            self._fail_all(PipelineError("the pipeline was reset"))
        finally:
            if self._call is call:
                self._call = None

    def describe(self, index: int) -> str:
        stage = self.stages[index]
        return f"device '{stage.name}' ({stage.address})"

    def explain(self, error: grpc.aio.AioRpcError) -> str:
        details = error.details() or error.code().name
        if error.code() == grpc.StatusCode.UNAUTHENTICATED:
            return f"{self.describe(0)} refused the cluster token: {details}"
        if error.code() == grpc.StatusCode.UNAVAILABLE and "worker " not in details:
            return f"{self.describe(0)} is unreachable: {details}"
        return f"stage failure ({error.code().name}): {details}"

    def _fail_all(self, error: Exception) -> None:
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(error)

    async def submit(self, request: pb.StepRequest) -> pb.StepResult:
        call = await self._ensure_open()
        future = asyncio.get_running_loop().create_future()
        self._pending[request.step_id] = future
        try:
            async with self._write_lock:
                await call.write(request)
        except Exception as error:  # the stream broke: AioRpcError, or "RPC already finished"
            self._pending.pop(request.step_id, None)
            if self._call is call:
                await self.reset()  # the next step opens a new stream
            details = self.explain(error) if isinstance(error, grpc.aio.AioRpcError) else str(error)
            raise PipelineError(f"the stream to {self.describe(0)} broke: {details}") from None
        try:
            return await asyncio.wait_for(future, self.step_timeout)
        except asyncio.TimeoutError:
            self._pending.pop(request.step_id, None)
            await self.reset()
            raise PipelineError(
                f"step timed out after {self.step_timeout:.0f} s in the chain from {self.describe(0)}"
            ) from None

    async def reset(self) -> None:
        """Close the stream; in-flight steps fail, the next step opens a new one."""
        call, self._call = self._call, None
        if call is not None:
            call.cancel()
        if self._reader is not None:
            self._reader.cancel()
            self._reader = None
        self._fail_all(PipelineError("the pipeline was reset"))


class Pipeline:
    def __init__(
        self,
        local_stages: list[Stage],
        remote: RemoteChain | None,
        token: str | None = None,
        local_name: str = "coordinator",
    ):
        if not local_stages and remote is None:
            raise ValueError("a pipeline needs at least one stage")
        self.local_stages = local_stages
        self.remote = remote
        self.token = token
        self.local_name = local_name
        self.sampler = Sampler() if remote is None else None
        self.compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compute")
        self._step_ids = itertools.count(1)
        self.listeners: list[StepListener] = []

    @property
    def depth(self) -> int:
        """Number of stages: how many steps can usefully be in flight at once."""
        return len(self.local_stages) + (len(self.remote.stages) if self.remote else 0)

    def next_step_id(self) -> int:
        return next(self._step_ids)

    def _notify(self, stage: str, seconds: float) -> None:
        for listener in self.listeners:
            try:
                listener(stage, seconds)
            except Exception:  # metrics must never break serving
                log.exception("step listener failed")

    def _run_local(self, step: StepInput) -> pb.StepRequest | list[SampledToken]:
        for index, stage in enumerate(self.local_stages):
            started = time.perf_counter()
            output = stage.forward(step)
            self._notify(
                f"{self.local_name}/{index}" if len(self.local_stages) > 1 else self.local_name,
                time.perf_counter() - started,
            )
            if stage.is_last:
                assert self.sampler is not None and output.logits is not None  # no remote: sampled here
                return self.sampler.sample(output.segments, output.logits)
            step = StepInput(step.step_id, step.segments, hidden_states=output.hidden_states)
        return encode_step(step)  # encoded here, off the event loop

    async def run_step(self, step: StepInput) -> list[SampledToken]:
        loop = asyncio.get_running_loop()
        if self.local_stages:
            try:
                result = await loop.run_in_executor(self.compute, self._run_local, step)
            except Exception as error:
                log.exception("local stage failed")
                raise PipelineError(f"device '{self.local_name}' (local stage): {error}") from error
        else:
            result = await loop.run_in_executor(self.compute, encode_step, step)
        if isinstance(result, list):
            return result
        assert self.remote is not None  # no local last stage: the chain ends remotely
        started = time.perf_counter()
        reply = await self.remote.submit(result)
        self._notify("remote chain", time.perf_counter() - started)
        for timing in reply.timings:
            self._notify(timing.stage, timing.seconds)
        return decode_result(reply).tokens

    async def release(self, seq_ids: list[int]) -> None:
        """Drop these sequences' caches on every stage (best effort: a dead worker has none anyway)."""
        if not seq_ids:
            return

        def release_local() -> None:
            for stage in self.local_stages:
                stage.release(seq_ids)
            if self.sampler is not None:
                self.sampler.release(seq_ids)

        await asyncio.get_running_loop().run_in_executor(self.compute, release_local)
        if self.remote is not None:
            request = pb.ReleaseRequest(seq_ids=seq_ids)
            metadata = token_metadata(self.token)
            calls = [
                stage.stub.Release(request, metadata=metadata, timeout=5.0) for stage in self.remote.stages
            ]
            for stage, outcome in zip(
                self.remote.stages, await asyncio.gather(*calls, return_exceptions=True), strict=True
            ):
                if isinstance(outcome, Exception):
                    log.debug("release on %s failed: %s", stage.name, outcome)

    async def close(self) -> None:
        if self.remote is not None:
            await self.remote.reset()
        self.compute.shutdown(wait=False, cancel_futures=True)
