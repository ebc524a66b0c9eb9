"""Starting a coordinator: open the checkpoint, ask every worker what it has, plan the layers, load
every stage, and hand the running parts to `Coordinator`. A failed start closes what it opened."""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
import time
from pathlib import Path
from typing import Any

from meshllm.devices import StageInfo, describe_host
from meshllm.engines import default_engine, guess_device_type, load_stage, read_bandwidth
from meshllm.errors import StageError
from meshllm.models.checkpoint import DEMO_MODEL, Checkpoint
from meshllm.models.plan import StagePlan, make_plan
from meshllm.models.tokenizer import load_tokenizer
from meshllm.runtime.coordinator import Coordinator
from meshllm.runtime.coordinator_config import CoordinatorConfig
from meshllm.runtime.engine_client import ServedModel
from meshllm.runtime.engine_loop import EngineLoop
from meshllm.runtime.monitor import DeviceMonitor
from meshllm.runtime.pipeline import Pipeline
from meshllm.runtime.scheduler import Scheduler
from meshllm.runtime.stage_host import LocalStageHost
from meshllm.step import LayerRange
from meshllm.transport.rpc import PROTOCOL_VERSION, VERSION
from meshllm.transport.stage import LoadSpec
from meshllm.transport.stage_client import ForwardChain, StageClient

log = logging.getLogger(__name__)


async def start_coordinator(config: CoordinatorConfig) -> Coordinator:
    """Plan the layers over this process (when `config.local_stage`) and the workers, load them all."""
    clients = [StageClient(w.name, w.address, config.token, config.tls) for w in config.workers]
    try:
        return await _start(config, clients)
    except BaseException:
        for client in clients:
            await client.close()
        raise


async def _start(config: CoordinatorConfig, clients: list[StageClient]) -> Coordinator:
    engine = config.engine or default_engine()
    checkpoint = await asyncio.to_thread(Checkpoint.open, config.model)
    tokenizer = await asyncio.to_thread(load_tokenizer, checkpoint.path)
    model_config = checkpoint.config
    eos_token_ids = tuple(sorted(set(model_config.eos_token_ids) | _tokenizer_eos(tokenizer)))
    served = ServedModel(
        name=_served_name(config.model, checkpoint),
        root=str(checkpoint.path),
        max_context=model_config.max_position_embeddings,
        vocab_size=model_config.vocab_size,
        eos_token_ids=eos_token_ids,
    )

    infos = await asyncio.gather(*(_ask(client) for client in clients))
    hosts = {info.hostname for info in infos} | ({socket.gethostname()} if config.local_stage else set())
    # Devices of one machine read at one speed: measuring them would only measure each other's noise.
    measure = _plan_needs_speeds(config) and len(hosts) > 1
    speeds = await _measure_speeds(config, engine, clients) if measure else None
    memory = dict(config.memory_overrides)
    devices: list[tuple[str, int]] = []
    if config.local_stage:
        # The memory of the device the local stage will run on: the GPU's when it runs on CUDA.
        local = describe_host(guess_device_type(engine, config.device))
        devices.append((config.name, memory.get(config.name, local.memory_available)))
    for client, info in zip(clients, infos, strict=True):
        devices.append((client.name, memory.get(client.name, info.memory_available)))
    plan = make_plan(
        checkpoint,
        devices,
        config.dtype,
        dict(config.layer_overrides) or None,
        quantize={name: config.quantize_of(name) for name, _ in devices},
        group_size=config.group_size,
        speeds=speeds,
    )
    for planned in plan:
        log.info(
            "plan: %s runs layers %s (%.1f MB)",
            planned.device,
            planned.layer_range,
            planned.weight_bytes / 1e6,
        )

    local_hosts = []
    if config.local_stage:
        layer_range = plan[0].layer_range
        quantize = config.quantize_of(config.name)
        stage = await asyncio.to_thread(
            load_stage,
            engine,
            checkpoint,
            layer_range,
            dtype=config.dtype,
            device=config.device,
            quantize=quantize,
            group_size=config.group_size,
        )
        local_hosts.append(
            LocalStageHost.of(config.name, stage, config.model, model_config.num_hidden_layers, quantize)
        )
    worker_plan = plan[int(config.local_stage) :]
    next_stages = [client.address for client in clients[1:]] + [""]

    async def load(client: StageClient) -> None:
        index = clients.index(client)
        await _load(config, client, worker_plan[index], next_stages[index])

    await asyncio.gather(*(load(client) for client in clients))

    remote = ForwardChain(clients, config.step_timeout) if clients else None
    pipeline = Pipeline(local_hosts, remote, local_name=config.name)
    scheduler = Scheduler(
        pipeline.depth, max_step_tokens=config.max_step_tokens, max_running=config.max_running
    )

    async def reload(client: StageClient) -> None:
        await load(client)
        if remote is not None:
            await remote.reset()  # every stage after it needs a new stream

    monitor = DeviceMonitor(
        config.model,
        config.name,
        local_hosts,
        [(client, planned.layer_range) for client, planned in zip(clients, worker_plan, strict=True)],
        reload,
    )
    await monitor.refresh()
    whole = (lambda: not monitor.unhealthy()) if clients else None  # only remote stages come back
    engine_loop = EngineLoop(scheduler, pipeline, whole=whole, replay_timeout=config.replay_timeout)
    coordinator = Coordinator(config, served, tokenizer, plan, engine_loop, monitor, clients)
    monitor.start(config.monitor_interval)
    return coordinator


def _plan_needs_speeds(config: CoordinatorConfig) -> bool:
    return len(config.device_names) > 1 and not config.layer_overrides


async def _measure_speeds(
    config: CoordinatorConfig, engine: str, clients: list[StageClient]
) -> dict[str, float]:
    """Every device's read speed in its own dtype and quantization, one device at a time (devices that
    share a machine would slow each other's measurement). Speeds within half of the fastest count as
    the fastest: a shared machine's noise reaches that much, and it must not move layers around."""
    speeds: dict[str, float] = {}
    if config.local_stage:
        quantize = config.quantize_of(config.name)
        speeds[config.name] = await asyncio.to_thread(
            _local_bandwidth, engine, config.dtype, quantize, config.group_size, config.device
        )
    for client in clients:
        spec = LoadSpec(
            config.model,
            LayerRange(0, 1),
            config.dtype,
            None,
            config.quantize_of(client.name),
            config.group_size,
        )
        speeds[client.name] = (await client.info(timeout=120.0, calibrate=spec)).read_bandwidth
    fastest = max(speeds.values())
    if fastest <= 0:
        return {}
    relative = {name: speed / fastest for name, speed in speeds.items()}
    log.info("read speeds: %s", ", ".join(f"{name} {speed / 1e9:.1f} GB/s" for name, speed in speeds.items()))
    return {name: 1.0 if share >= 0.5 else share for name, share in relative.items()}


@functools.cache
def _local_bandwidth(
    engine: str, dtype: str, quantize: str | None, group_size: int, device: str | None
) -> float:
    """This process's read speed, measured once per dtype and quantization."""
    return read_bandwidth(engine, dtype, quantize, group_size, device)


async def _ask(client: StageClient) -> StageInfo:
    """The worker's Info; a StageError when it runs another version of meshllm or of the protocol."""
    info = await client.info(timeout=10.0)
    if info.version != VERSION or info.protocol_version != PROTOCOL_VERSION:
        raise StageError(
            f"{client.describe()} runs meshllm {info.version or '?'} (protocol {info.protocol_version}), "
            f"the coordinator {VERSION} (protocol {PROTOCOL_VERSION}); install the same version on both"
        )
    return info


async def _load(config: CoordinatorConfig, client: StageClient, stage: StagePlan, next_stage: str) -> None:
    started = time.perf_counter()
    spec = LoadSpec(
        config.model,
        stage.layer_range,
        config.dtype,
        quantize=config.quantize_of(client.name),
        group_size=config.group_size,
    )
    await client.load(spec, next_stage, lambda message: log.info("%s: %s", client.name, message))
    log.info("%s loaded layers %s in %.1f s", client.name, stage.layer_range, time.perf_counter() - started)


def _served_name(reference: str, checkpoint: Checkpoint) -> str:
    if reference == DEMO_MODEL:
        return DEMO_MODEL
    if Path(reference).expanduser().exists():
        return checkpoint.path.name
    return reference


def _tokenizer_eos(tokenizer: Any) -> set[int]:
    eos = getattr(tokenizer, "eos_token_id", None)
    return {eos} if isinstance(eos, int) else set()
