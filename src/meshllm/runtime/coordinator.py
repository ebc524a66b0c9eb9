"""The coordinator: plans the layers over its devices, loads every stage, drives the scheduler, and
watches its workers (a worker that comes back after a restart is loaded again with its range)."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc

from meshllm import __version__
from meshllm.devices import DeviceStatus, describe_host
from meshllm.engines import default_engine, load_stage
from meshllm.engines.base import Stage
from meshllm.errors import ConfigError, StageError
from meshllm.models.checkpoint import DEMO_MODEL, Checkpoint
from meshllm.models.config import ModelConfig
from meshllm.models.plan import StagePlan, make_plan
from meshllm.models.tokenizer import chat_prompt_ids, load_tokenizer
from meshllm.runtime.engine_client import GenerateRequest, ServedModel
from meshllm.runtime.pipeline import Pipeline, RemoteChain, RemoteStage, StepListener
from meshllm.runtime.scheduler import Scheduler, SequenceHandle
from meshllm.step import PipelineUnavailable, SamplingParams
from meshllm.transport.proto import meshllm_pb2 as pb
from meshllm.transport.rpc import CHANNEL_OPTIONS, token_metadata

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerAddress:
    name: str
    address: str  # "host:port" the coordinator (and the previous stage) dials


def _rpc_error(worker: WorkerAddress, error: grpc.aio.AioRpcError) -> str:
    if error.code() == grpc.StatusCode.UNAUTHENTICATED:
        return f"device '{worker.name}' ({worker.address}) refused the cluster token; give it the same token as the coordinator"
    if error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return (
            f"device '{worker.name}' ({worker.address}) is unreachable ({error.code().name.lower()}); "
            f"is `meshllm worker --port {worker.address.rsplit(':', 1)[-1]}` running there?"
        )
    return f"device '{worker.name}' ({worker.address}): {error.details()}"


class Coordinator:
    """Build with `await Coordinator.start(...)`; close with `await coordinator.close()`."""

    # Set while starting (see `_start`), once the checkpoint, the plan and the stages are known.
    checkpoint: Checkpoint
    config: ModelConfig
    tokenizer: Any
    model_name: str
    max_context: int
    eos_token_ids: tuple[int, ...]
    plan: list[StagePlan]
    pipeline: Pipeline
    scheduler: Scheduler
    _monitor: asyncio.Task

    def __init__(
        self,
        model: str,
        workers: list[WorkerAddress],
        dtype: str,
        engine: str,
        token: str | None,
        name: str,
        step_timeout: float,
    ):
        self.model_reference = model
        self.workers = workers
        self.dtype = dtype
        self.engine = engine
        self.token = token
        self.name = name
        self.step_timeout = step_timeout
        self.local_stages: list[Stage] = []
        self._worker_plan: dict[str, StagePlan] = {}
        self._status: dict[str, DeviceStatus] = {}
        self._reloading: set[str] = set()
        self._closed = False
        self._channels = {
            w.name: grpc.aio.insecure_channel(w.address, options=CHANNEL_OPTIONS) for w in self.workers
        }

    @classmethod
    async def start(
        cls,
        model: str,
        workers: list[WorkerAddress] | tuple[WorkerAddress, ...] = (),
        local_stage: bool = True,
        dtype: str = "float32",
        engine: str | None = None,
        token: str | None = None,
        memory_overrides: dict[str, int] | None = None,
        layer_overrides: dict[str, tuple[int, int]] | None = None,
        step_timeout: float = 30.0,
        name: str = "coordinator",
        monitor_interval: float = 1.0,
        max_step_tokens: int = 512,
        max_running: int = 128,
    ) -> Coordinator:
        """Plan the layers over this process (when `local_stage`) and `workers`, load them all, and serve."""
        if not local_stage and not workers:
            raise ConfigError("the coordinator computes nothing (--no-local-stage) and has no workers")
        names = [name] * local_stage + [w.name for w in workers]
        if len(set(names)) != len(names):
            raise ConfigError(f"device names must be unique, got {', '.join(names)}")
        self = cls(model, list(workers), dtype, engine or default_engine(), token, name, step_timeout)
        try:
            await self._start(local_stage, memory_overrides, layer_overrides, max_step_tokens, max_running)
        except BaseException:
            await self._close_channels()
            raise
        self._monitor = asyncio.create_task(self._watch(monitor_interval))
        return self

    async def _start(
        self,
        local_stage: bool,
        memory_overrides: dict[str, int] | None,
        layer_overrides: dict[str, tuple[int, int]] | None,
        max_step_tokens: int,
        max_running: int,
    ) -> None:
        self.checkpoint = await asyncio.to_thread(Checkpoint.open, self.model_reference)
        self.config = self.checkpoint.config
        self.tokenizer = await asyncio.to_thread(load_tokenizer, self.checkpoint.path)
        self.model_name = _served_name(self.model_reference, self.checkpoint)
        self.max_context = self.config.max_position_embeddings
        self.eos_token_ids = tuple(sorted(set(self.config.eos_token_ids) | _tokenizer_eos(self.tokenizer)))

        infos = await asyncio.gather(*(self._info(w, timeout=10.0) for w in self.workers))
        memory = dict(memory_overrides or {})
        devices: list[tuple[str, int]] = []
        if local_stage:
            local = describe_host("cpu")
            devices.append((self.name, memory.get(self.name, local.memory_available)))
        for worker, info in zip(self.workers, infos, strict=True):
            devices.append((worker.name, memory.get(worker.name, info.memory_available)))
        self.plan = make_plan(self.checkpoint, devices, self.dtype, layer_overrides)
        for stage in self.plan:
            log.info(
                "plan: %s runs layers [%d, %d) (%.1f MB)",
                stage.device,
                *stage.layer_range,
                stage.weight_bytes / 1e6,
            )

        if local_stage:
            layer_range = self.plan[0].layer_range
            self.local_stages.append(
                await asyncio.to_thread(
                    load_stage, self.engine, self.checkpoint, layer_range, dtype=self.dtype
                )
            )
        self._worker_plan = {stage.device: stage for stage in self.plan[int(local_stage) :]}
        await asyncio.gather(*(self._load(w) for w in self.workers))

        remote = None
        if self.workers:
            remote_stages = [RemoteStage(w.name, w.address, self._channels[w.name]) for w in self.workers]
            remote = RemoteChain(remote_stages, self.token, self.step_timeout)
        self.pipeline = Pipeline(self.local_stages, remote, token=self.token, local_name=self.name)
        self.scheduler = Scheduler(self.pipeline, max_step_tokens=max_step_tokens, max_running=max_running)
        await self.devices()

    # ---- workers -------------------------------------------------------------------------------

    def _stub(self, worker: WorkerAddress):
        from meshllm.transport.proto import meshllm_pb2_grpc as pbg

        return pbg.StageStub(self._channels[worker.name])

    async def _info(self, worker: WorkerAddress, timeout: float = 3.0) -> pb.InfoReply:
        try:
            return await self._stub(worker).Info(
                pb.InfoRequest(), metadata=token_metadata(self.token), timeout=timeout
            )
        except grpc.aio.AioRpcError as error:
            raise StageError(_rpc_error(worker, error)) from None

    def _next_address(self, worker: WorkerAddress) -> str:
        index = self.workers.index(worker)
        return self.workers[index + 1].address if index + 1 < len(self.workers) else ""

    async def _load(self, worker: WorkerAddress) -> None:
        stage = self._worker_plan[worker.name]
        request = pb.LoadRequest(
            model=self.model_reference,
            layer_start=stage.layer_range[0],
            layer_end=stage.layer_range[1],
            dtype=self.dtype,
            next_stage=self._next_address(worker),
        )
        started = time.perf_counter()
        try:
            async for progress in self._stub(worker).Load(request, metadata=token_metadata(self.token)):
                if progress.error:
                    raise StageError(
                        f"device '{worker.name}' ({worker.address}) failed to load: {progress.error}"
                    )
                log.info("%s: %s", worker.name, progress.message)
        except grpc.aio.AioRpcError as error:
            raise StageError(_rpc_error(worker, error)) from None
        log.info(
            "%s loaded layers [%d, %d) in %.1f s",
            worker.name,
            *stage.layer_range,
            time.perf_counter() - started,
        )

    async def _watch(self, interval: float) -> None:
        """Refresh every device's status; reload a worker that restarted and lost its layers."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self.devices()
                for worker in self.workers:
                    status = self._status.get(worker.name)
                    if status and status.status == "not loaded" and worker.name not in self._reloading:
                        asyncio.create_task(self._reload(worker))
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("device monitor failed")

    async def _reload(self, worker: WorkerAddress) -> None:
        self._reloading.add(worker.name)
        try:
            log.warning("%s came back without its layers: loading them again", worker.name)
            await self._load(worker)
            if self.pipeline.remote is not None:
                await self.pipeline.remote.reset()  # every stage after it needs a new stream
            await self.devices()
        except Exception as error:
            log.error("reloading %s failed: %s", worker.name, error)
        finally:
            self._reloading.discard(worker.name)

    # ---- status --------------------------------------------------------------------------------

    def _local_status(self) -> list[DeviceStatus]:
        statuses = []
        for index, stage in enumerate(self.local_stages):
            info = describe_host(getattr(stage, "device_type", "cpu"))
            statuses.append(
                DeviceStatus(
                    device_id=index,
                    name=self.name,
                    hostname=info.hostname,
                    address="local",
                    role="coordinator",
                    status="healthy",
                    engine=getattr(stage, "engine", self.engine),
                    device_type=info.device_type,
                    memory_total=info.memory_total,
                    memory_available=info.memory_available,
                    weight_bytes=stage.weight_bytes(),
                    layers=stage.layer_range,
                    live_sequences=stage.live_sequences(),
                    rtt_ms=None,
                    version=__version__,
                )
            )
        return statuses

    async def _worker_status(self, device_id: int, worker: WorkerAddress) -> DeviceStatus:
        planned = self._worker_plan[worker.name].layer_range
        started = time.perf_counter()
        try:
            info = await self._info(worker, timeout=2.0)
        except StageError as error:
            previous = self._status.get(worker.name)
            return DeviceStatus(
                device_id=device_id, name=worker.name, hostname=previous.hostname if previous else "",
                address=worker.address, role="worker", status="unreachable", engine=previous.engine if previous else "",
                device_type=previous.device_type if previous else "", memory_total=0, memory_available=0,
                weight_bytes=0, layers=planned, live_sequences=0, rtt_ms=None, version="", error=str(error),
            )  # fmt: skip
        rtt_ms = (time.perf_counter() - started) * 1000
        loaded = info.model == self.model_reference and (info.layer_start, info.layer_end) == planned
        return DeviceStatus(
            device_id=device_id,
            name=worker.name,
            hostname=info.hostname,
            address=worker.address,
            role="worker",
            status="healthy" if loaded else "not loaded",
            engine=info.engine,
            device_type=info.device_type,
            memory_total=info.memory_total,
            memory_available=info.memory_available,
            weight_bytes=info.weight_bytes,
            layers=planned,
            live_sequences=info.live_sequences,
            rtt_ms=round(rtt_ms, 3),
            version=info.version,
            error="" if loaded else f"device '{worker.name}' has not loaded its layers",
        )

    async def devices(self) -> list[DeviceStatus]:
        """Ask every device now; also refreshes the snapshot the health check reads."""
        offset = len(self.local_stages)
        remote = await asyncio.gather(
            *(self._worker_status(offset + i, w) for i, w in enumerate(self.workers))
        )
        statuses = self._local_status() + list(remote)
        self._status = {status.name: status for status in statuses}
        return statuses

    def devices_snapshot(self) -> list[DeviceStatus]:
        return list(self._status.values())

    @property
    def healthy(self) -> bool:
        return all(status.status == "healthy" for status in self._status.values())

    def unhealthy_devices(self) -> list[DeviceStatus]:
        return [status for status in self._status.values() if status.status != "healthy"]

    @property
    def live_sequences(self) -> int:
        return self.scheduler.live_sequences

    def add_step_listener(self, listener: StepListener) -> None:
        self.pipeline.listeners.append(listener)

    # ---- generation ----------------------------------------------------------------------------

    @property
    def model(self) -> ServedModel:
        return ServedModel(
            name=self.model_name,
            root=str(self.checkpoint.path),
            max_context=self.max_context,
            vocab_size=self.config.vocab_size,
            eos_token_ids=self.eos_token_ids,
        )

    def chat_prompt_ids(self, messages: list[dict[str, Any]], template_kwargs: dict[str, Any]) -> list[int]:
        return chat_prompt_ids(self.tokenizer, messages, template_kwargs)

    def generate(self, request: GenerateRequest) -> SequenceHandle:
        return self.submit(
            request.prompt_ids,
            request.sampling,
            request.max_tokens,
            ignore_eos=request.ignore_eos,
            stop_token_ids=request.stop_token_ids,
        )

    def abort(self, seq_id: int) -> None:
        self.scheduler.cancel(seq_id)

    def submit(
        self,
        prompt_ids: list[int],
        sampling: SamplingParams,
        max_tokens: int,
        ignore_eos: bool = False,
        stop_token_ids: frozenset[int] = frozenset(),
    ) -> SequenceHandle:
        if self._closed:
            raise PipelineUnavailable("the coordinator is shutting down")
        down = self.unhealthy_devices()
        if down:
            raise PipelineUnavailable(
                "; ".join(status.error or f"device '{status.name}' is {status.status}" for status in down)
            )
        if len(prompt_ids) + max_tokens > self.max_context:
            raise ValueError(
                f"prompt ({len(prompt_ids)} tokens) plus max_tokens ({max_tokens}) exceeds the context of "
                f"{self.max_context} tokens"
            )
        if not sampling.eos_token_ids:
            sampling = replace(sampling, eos_token_ids=self.eos_token_ids)
        return self.scheduler.submit(
            prompt_ids, sampling, max_tokens, ignore_eos=ignore_eos, stop_token_ids=stop_token_ids
        )

    def cancel(self, seq_id: int) -> None:
        self.scheduler.cancel(seq_id)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._monitor.cancel()
        await self.scheduler.close()
        await self.pipeline.close()
        await self._close_channels()

    async def _close_channels(self) -> None:
        for channel in self._channels.values():
            await channel.close()


def _served_name(reference: str, checkpoint: Checkpoint) -> str:
    if reference == DEMO_MODEL:
        return DEMO_MODEL
    if Path(reference).expanduser().exists():
        return checkpoint.path.name
    return reference


def _tokenizer_eos(tokenizer) -> set[int]:
    eos = getattr(tokenizer, "eos_token_id", None)
    return {eos} if isinstance(eos, int) else set()
