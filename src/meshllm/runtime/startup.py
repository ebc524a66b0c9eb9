"""Starting a coordinator: open the checkpoint, ask every worker what it has, plan the layers, load
every stage, and hand the running parts to `Coordinator`. A failed start closes what it opened."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from meshllm import compute
from meshllm.defaults import AUTO_DTYPE, PREDICT_ENV
from meshllm.devices import (
    Calibration,
    LayerShape,
    Link,
    Precision,
    StageInfo,
    describe_host,
    steps_in_flight,
)
from meshllm.engines import calibrate, default_engine, guess_device_type, load_stage
from meshllm.errors import ConfigError, StageError
from meshllm.models.balance import StageSeconds
from meshllm.models.checkpoint import DEMO_MODEL, Checkpoint
from meshllm.models.plan import StagePlan, make_plan
from meshllm.models.predict import MEAN_CONTEXT, CostModel, best_schedule, describe, predict, step_balance
from meshllm.models.tokenizer import load_tokenizer
from meshllm.runtime.coordinator import Coordinator
from meshllm.runtime.coordinator_config import CoordinatorConfig
from meshllm.runtime.engine_client import ServedModel
from meshllm.runtime.engine_loop import EngineLoop
from meshllm.runtime.monitor import DeviceMonitor
from meshllm.runtime.pipeline import Pipeline
from meshllm.runtime.replan import Replanner
from meshllm.runtime.scheduler import KVBudget, Scheduler
from meshllm.runtime.stage_host import LocalStageHost
from meshllm.runtime.weights import CheckpointWeights
from meshllm.step import LayerRange
from meshllm.transport.rpc import PROTOCOL_VERSION, VERSION
from meshllm.transport.stage import LoadSpec, LoadUpdate, WeightsFrom
from meshllm.transport.stage_client import StageClient
from meshllm.transport.step_link import StepChain
from meshllm.transport.weights import WeightsServer

log = logging.getLogger(__name__)


OnLoad = Callable[[str, LoadUpdate], None]


async def start_coordinator(config: CoordinatorConfig, on_load: OnLoad | None = None) -> Coordinator:
    """Plan the layers over this process (when `config.local_stage`) and the workers, load them all;
    `on_load(device, update)` hears how each worker's load goes."""
    clients = [StageClient(w.name, w.address, config.token, config.tls) for w in config.workers]
    weights: list[WeightsServer] = []  # started once the checkpoint is open
    try:
        coordinator = await _start(config, clients, weights, on_load)
    except BaseException:
        for client in clients:
            await client.close()
        for server in weights:
            await server.stop()
        raise
    coordinator.weights_server = weights[0] if weights else None
    return coordinator


async def _serve_weights(config: CoordinatorConfig, checkpoint: Checkpoint) -> WeightsServer:
    assert config.weights_listen is not None  # only when some worker takes its weights from here
    source = await asyncio.to_thread(CheckpointWeights, checkpoint)
    server = WeightsServer(
        source, config.weights_listen, config.token, f"coordinator {config.name}", config.tls
    )
    try:
        await server.start()
    except OSError as error:
        raise ConfigError(f"coordinator: {error}") from None
    return server


async def _open_model(config: CoordinatorConfig) -> tuple[CoordinatorConfig, Checkpoint, str]:
    """The checkpoint, the config with its dtype resolved ("auto": the model's own) and the engine of this
    process's stage (`--engine`, else the default for its device and this checkpoint)."""
    checkpoint = await asyncio.to_thread(Checkpoint.open, config.model)
    if config.dtype == AUTO_DTYPE:
        config = replace(config, dtype=checkpoint.own_dtype)
        log.info("dtype %s: the model's own (--dtype chooses another)", config.dtype)
    return config, checkpoint, config.engine or default_engine(config.device, checkpoint)


async def _start(
    config: CoordinatorConfig,
    clients: list[StageClient],
    weights: list[WeightsServer],
    on_load: OnLoad | None,
) -> Coordinator:
    config, checkpoint, engine = await _open_model(config)
    if checkpoint.gguf is not None and config.local_stage and engine != "ggml":
        raise ConfigError(
            f"model {config.model!r} is a GGUF file, which only the ggml engine reads: pass --engine ggml"
        )
    if any(config.weights_of(client.name) for client in clients):
        weights.append(await _serve_weights(config, checkpoint))
    weights_key = weights[0].source.key if weights else ""
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

    predicting = os.environ.get(PREDICT_ENV, "1") != "0"
    survey = await _survey(config, engine, checkpoint, clients, predicting)
    plan = survey.plan

    local_hosts = []
    if config.local_stage:
        layer_range = plan[0].layer_range
        quantize = config.quantize_of(config.name)
        load_local = functools.partial(
            load_stage,
            engine,
            checkpoint,
            layer_range,
            dtype=config.dtype,
            device=config.device,
            quantize=quantize,
            group_size=config.group_size,
        )
        stage = await compute.run_async(load_local)
        host = LocalStageHost.of(
            config.name,
            stage,
            config.model,
            model_config.num_hidden_layers,
            quantize,
            kv_memory=config.kv_memory,
        )
        host.device = config.device  # where its layers load again, should the plan change
        host.set_threads(config.threads, config.threads_alone)
        local_hosts.append(host)
    worker_plan = plan[int(config.local_stage) :]
    next_stages = [*(client.address for client in clients[1:]), ""][: len(clients)]

    async def load(client: StageClient, layers: LayerRange, next_stage: str) -> None:
        await _load(config, client, layers, next_stage, weights_key, on_load)

    await asyncio.gather(
        *(
            load(client, planned.layer_range, next_stage)
            for client, planned, next_stage in zip(clients, worker_plan, next_stages, strict=True)
        )
    )
    turns: bool | None = None  # whether stages sharing a compute unit take turns, as predicted faster
    if predicting:
        lines, turns = await _predict(config, checkpoint, survey, clients)
        for line in lines:
            log.info("%s", line)

    remote = StepChain(clients, config.step_timeout) if clients else None
    pipeline = Pipeline(local_hosts, remote, local_name=config.name, computes=survey.computes)
    pipeline.take_turns = config.shared_stages == "turns" or (config.shared_stages == "auto" and bool(turns))
    if pipeline.depth < len(plan):
        log.info(
            "%d stages compute on %d unit%s (stages that share a machine's cores take turns): "
            "%d step%s in flight at a time",
            len(plan),
            pipeline.depth,
            "" if pipeline.depth == 1 else "s",
            pipeline.depth,
            "" if pipeline.depth == 1 else "s",
        )
    kv_budgets = await _kv_budgets(local_hosts, clients)
    scheduler = Scheduler(
        pipeline.depth,
        max_step_tokens=config.max_step_tokens,
        max_running=config.max_running,
        kv_budgets=kv_budgets,
    )

    replanner: Replanner | None = None

    async def reload(client: StageClient) -> None:
        assert replanner is not None
        await replanner.reload(client)

    monitor = DeviceMonitor(
        config.model,
        config.name,
        local_hosts,
        [(client, planned.layer_range) for client, planned in zip(clients, worker_plan, strict=True)],
        reload,
        device_models=config.device_models,
    )
    await monitor.refresh()

    def whole() -> bool:
        return replanner is not None and replanner.settled and not monitor.unhealthy()

    # Only remote stages come back.
    engine_loop = EngineLoop(
        scheduler, pipeline, whole=whole if clients else None, replay_timeout=config.replay_timeout
    )
    replanner = Replanner(
        config, checkpoint, plan, clients, local_hosts, engine_loop, monitor, survey.speeds, load
    )
    if clients:
        monitor.after_refresh = replanner.check
    coordinator = Coordinator(config, served, tokenizer, replanner, engine_loop, monitor, clients)
    monitor.start(config.monitor_interval)
    return coordinator


async def _kv_budgets(local_hosts: list[LocalStageHost], clients: list[StageClient]) -> list[KVBudget]:
    """What every loaded stage says its KV caches may hold."""
    named = [(host.name, host.info()) for host in local_hosts]
    named += [(client.name, await client.info(timeout=10.0)) for client in clients]
    budgets = [KVBudget(name, info.kv_bytes_per_token, info.kv_memory) for name, info in named]
    for budget in budgets:
        if budget.bytes_per_token and budget.memory:
            log.info(
                "%s: KV caches may take %.1f MB, %d tokens at %d bytes each",
                budget.device,
                budget.memory / 1e6,
                budget.tokens,
                budget.bytes_per_token,
            )
    return budgets


@dataclass(frozen=True)
class Survey:
    """What a start learns before it loads anything: the devices, their speeds, and the plan."""

    devices: list[tuple[str, int]]  # (name, bytes of memory available), in chain order
    calibrations: dict[str, Calibration]  # by device, when measured
    plan: list[StagePlan]
    speeds: dict[str, float] | None = None  # read speeds the plan balanced, relative to the fastest
    computes: dict[str, str] = field(default_factory=dict)  # what each device computes on, by device


async def _survey(
    config: CoordinatorConfig,
    engine: str,
    checkpoint: Checkpoint,
    clients: list[StageClient],
    calibrate: bool,
) -> Survey:
    """Ask every worker, measure the devices when the plan or a prediction needs it, and plan."""
    infos = await asyncio.gather(*(_ask(client) for client in clients))
    hosts = {info.hostname for info in infos} | ({socket.gethostname()} if config.local_stage else set())
    # Devices of one machine read at one speed: measuring them would only measure each other's noise.
    measure = _plan_needs_speeds(config) and len(hosts) > 1
    calibrations = await _calibrate(config, engine, checkpoint, clients) if measure or calibrate else {}
    speeds = _relative_speeds(calibrations) if measure else None
    memory = dict(config.memory_overrides)
    devices: list[tuple[str, int]] = []
    computes = {client.name: info.compute for client, info in zip(clients, infos, strict=True)}
    if config.local_stage:
        # The memory of the device the local stage will run on: the GPU's when it runs on CUDA.
        local = describe_host(guess_device_type(engine, config.device))
        devices.append((config.name, memory.get(config.name, local.memory_available)))
        computes[config.name] = local.compute
    for client, info in zip(clients, infos, strict=True):
        devices.append((client.name, memory.get(client.name, info.memory_available)))
    quantize = {name: config.quantize_of(name) for name, _ in devices}
    stage_seconds = _step_balance(config, checkpoint, devices, quantize, calibrations, computes)
    plan = make_plan(
        checkpoint,
        devices,
        config.dtype,
        dict(config.layer_overrides) or None,
        quantize=quantize,
        group_size=config.group_size,
        speeds=speeds,
        stage_seconds=stage_seconds,
    )
    if stage_seconds is not None and not config.layer_overrides:
        log.info(
            "plan: balanced for %d streams' decode steps (every stage computes on its own)", PREDICTED_STREAMS
        )
    for planned in plan:
        log.info(
            "plan: %s runs layers %s (%.1f MB)",
            planned.device,
            planned.layer_range,
            planned.weight_bytes / 1e6,
        )
    return Survey(devices, calibrations, plan, speeds, computes)


async def forecast(config: CoordinatorConfig) -> list[str]:
    """The plan a start would make and the speed it should give, measured on the idle devices; nothing is
    loaded. Lines for a person: the plan, each device's speeds, each link, the prediction."""
    clients = [StageClient(w.name, w.address, config.token, config.tls) for w in config.workers]
    try:
        config, checkpoint, engine = await _open_model(config)
        survey = await _survey(config, engine, checkpoint, clients, calibrate=True)
        ranges = " · ".join(f"{stage.device} layers {stage.layer_range}" for stage in survey.plan)
        lines, _ = await _predict(config, checkpoint, survey, clients)
        return [f"plan: {ranges}", *lines]
    finally:
        for client in clients:
            await client.close()


def _plan_needs_speeds(config: CoordinatorConfig) -> bool:
    return len(config.device_names) > 1 and not config.layer_overrides


async def _calibrate(
    config: CoordinatorConfig, engine: str, checkpoint: Checkpoint, clients: list[StageClient]
) -> dict[str, Calibration]:
    """Every device's speeds in its own dtype and quantization, one device at a time (devices that share
    a machine would slow each other's measurement); the read speed over the whole model as the device
    would hold it (up to 512 MB): what the stages of a machine read in turn, beyond a cache or within it;
    and two random decoder layers of the model's shape, timed (3–4 s for Qwen3-0.6B's on two cores: 16
    prompts of 160 tokens through two layers, the arithmetic of one 183-token prompt through all 28)."""
    calibrations: dict[str, Calibration] = {}
    model = CostModel(checkpoint, config.dtype, config.group_size)
    layers = checkpoint.config.num_hidden_layers

    def volume(quantize: str | None) -> int:
        return min(model.held(quantize).held(0, layers), CALIBRATION_VOLUME)

    # A GGUF file's blocks are held as stored: measure the speed of reading those.
    stored = checkpoint.gguf.stored_quantize() if checkpoint.gguf is not None else None
    layer = checkpoint.config.layer_shape(MEAN_CONTEXT)
    if config.local_stage:
        quantize = config.quantize_of(config.name)
        precision = Precision(config.dtype, quantize or stored, config.group_size)
        calibrations[config.name] = await compute.run_async(
            _local_calibration,
            engine,
            precision,
            config.device,
            config.threads,
            config.threads_alone,
            volume(quantize),
            layer,
        )
    for client in clients:
        quantize = config.quantize_of(client.name)
        precision = Precision(config.dtype, quantize or stored, config.group_size)
        info = await client.info(
            timeout=CALIBRATION_TIMEOUT, calibrate=precision, volume=volume(quantize), layer=layer
        )
        if info.calibration is None:
            raise StageError(f"{client.describe()} answered Info without the speeds it was asked to measure")
        calibrations[client.name] = info.calibration
    return calibrations


def _step_balance(
    config: CoordinatorConfig,
    checkpoint: Checkpoint,
    devices: list[tuple[str, int]],
    quantize: dict[str, str | None],
    calibrations: dict[str, Calibration],
    computes: dict[str, str],
) -> StageSeconds | None:
    """What the plan balances where every stage has a compute unit of its own (machines, or cores, of
    their own) and the layers of the model's shape were timed: the stages' decode steps of many streams
    (`predict.step_balance`), on the figures of the fastest device. Else None: bytes read a token."""
    names = [name for name, _ in devices]
    timed = [calibrations.get(name) for name in names]
    units = [computes.get(name, "") for name in names]
    if len(names) < 2 or steps_in_flight(units) < len(names):
        return None  # stages on one unit take turns: whatever the split, they do the same work in turn
    if not all(found is not None and found.layer_token_seconds for found in timed):
        return None
    fastest = max((found for found in timed if found is not None), key=lambda found: found.read_bandwidth)
    model = CostModel(checkpoint, config.dtype, config.group_size)
    return step_balance(model, fastest, [quantize.get(name) for name in names], PREDICTED_STREAMS)


def _relative_speeds(calibrations: dict[str, Calibration]) -> dict[str, float]:
    """Read speeds relative to the fastest. Within half of the fastest counts as the fastest: a shared
    machine's noise reaches that much, and it must not move layers around."""
    fastest = max((found.read_bandwidth for found in calibrations.values()), default=0.0)
    if fastest <= 0:
        return {}
    relative = {name: found.read_bandwidth / fastest for name, found in calibrations.items()}
    return {name: 1.0 if share >= 0.5 else share for name, share in relative.items()}


@functools.cache
def _local_calibration(
    engine: str,
    precision: Precision,
    device: str | None,
    threads: int | None,
    alone: int | None,
    volume: int,
    layer: LayerShape,
) -> Calibration:
    """This process's speeds, measured once per precision."""
    return calibrate(engine, precision, device, threads, volume, alone, layer)


PREDICTED_STREAMS = 16
CALIBRATION_VOLUME = 512 * 1024 * 1024  # the most bytes a calibration reads in its one-token pass
CALIBRATION_TIMEOUT = 600.0  # seconds a worker's calibration may take: large layers on a slow CPU


async def _links(config: CoordinatorConfig, clients: list[StageClient]) -> list[Link]:
    """The chain's links in order: this process to the first worker (when it runs a stage), then each
    worker to the next, measured by the worker."""
    links = [await clients[0].measure_link()] if config.local_stage and clients else []
    for client, following in zip(clients, clients[1:], strict=False):
        links.append(await client.probe(following.address))
    return links


async def _predict(
    config: CoordinatorConfig, checkpoint: Checkpoint, survey: Survey, clients: list[StageClient]
) -> tuple[list[str], bool | None]:
    """What the plan should give, with the fastest single device beside it: lines for a person; and
    whether stages that share a compute unit should take turns (None: no prediction was made)."""
    plan, devices, calibrations = survey.plan, survey.devices, survey.calibrations
    quantize = {name: config.quantize_of(name) for name, _ in devices}
    lines = [
        "device speeds: "
        + ", ".join(
            f"{name} reads {found.read_bandwidth / 1e9:.1f} GB/s"
            + (f" ({found.alone_read_bandwidth / 1e9:.1f} alone)" if found.alone_read_bandwidth else "")
            + f", computes {found.flop_rate / 1e9:.0f} GFLOP/s"
            + (f" ({found.decode_flop_rate / 1e9:.0f} decoding)" if found.decode_flop_rate else "")
            + (
                f", a layer adds {found.layer_token_seconds * 1e3:.2f} ms a decode token "
                + (
                    f"({found.layer_token_seconds_alone * 1e3:.2f} alone, "
                    if found.layer_token_seconds_alone
                    else "("
                )
                + f"{found.layer_prompt_seconds * 1e3:.2f} a prompt token, "
                f"{found.layer_step_seconds * 1e3:.2f} a one-token step)"
                if found.layer_token_seconds
                else ""
            )
            for name, found in calibrations.items()
        )
    ]
    try:
        links = await _links(config, clients)
    except StageError as error:
        return [*lines, f"no prediction: a link could not be measured: {error}"], None
    for (first, second), link in zip(zip(plan, plan[1:], strict=False), links, strict=False):
        lines.append(
            f"link {first.device} -> {second.device}: {link.round_trip * 1e3:.2f} ms round trip, "
            f"{link.bandwidth / 1e6:.0f} MB/s"
        )
    model = CostModel(checkpoint, config.dtype, config.group_size)
    activation = checkpoint.config.hidden_size * (4 if config.dtype == "float32" else 2)
    costs = model.stage_costs(plan, quantize, calibrations, survey.computes)
    if config.shared_stages == "auto":
        prediction, turns = best_schedule(costs, links, activation, PREDICTED_STREAMS)
    else:
        turns = config.shared_stages == "turns"
        prediction = predict(costs, links, activation, PREDICTED_STREAMS, take_turns=turns)
    if steps_in_flight([cost.compute for cost in costs]) < len(costs):
        other = predict(costs, links, activation, PREDICTED_STREAMS, take_turns=not turns)
        ways = ("taking turns, one step at a time", "computing at once, a micro-batch each")
        lines.append(
            f"stages on the same cores: {ways[not turns]} ({prediction.many_streams_total:.1f} tok/s for "
            f"{PREDICTED_STREAMS} streams with their prompts; {other.many_streams_total:.1f} "
            f"{ways[turns].split(',')[0]})"
        )
    alone = model.best_alone(devices, quantize, calibrations, PREDICTED_STREAMS)
    return [*lines, describe(prediction, alone, len(plan))], turns


async def _ask(client: StageClient) -> StageInfo:
    """The worker's Info; a StageError when it runs another version of meshllm or of the protocol."""
    info = await client.info(timeout=10.0)
    if info.version != VERSION or info.protocol_version != PROTOCOL_VERSION:
        raise StageError(
            f"{client.describe()} runs meshllm {info.version or '?'} (protocol {info.protocol_version}), "
            f"the coordinator {VERSION} (protocol {PROTOCOL_VERSION}); install the same version on both"
        )
    return info


async def _load(
    config: CoordinatorConfig,
    client: StageClient,
    layers: LayerRange,
    next_stage: str,
    weights_key: str,
    on_load: OnLoad | None,
) -> None:
    started = time.perf_counter()
    address = config.weights_of(client.name)
    spec = LoadSpec(
        config.model_of(client.name),
        layers,
        config.dtype,
        quantize=config.quantize_of(client.name),
        group_size=config.group_size,
        weights=WeightsFrom(address, weights_key) if address else None,
    )

    def progress(update: LoadUpdate) -> None:
        if update.phase != "fetch" or update.fraction in (0.0, 1.0) or update.done:
            log.info("%s: %s", client.name, update.message)  # the log gets the ends; the bars show the rest
        if on_load is not None:
            on_load(client.name, update)

    summary = await client.load(spec, next_stage, progress)
    log.info("%s: %s (%.1f s in all)", client.name, summary, time.perf_counter() - started)


def _served_name(reference: str, checkpoint: Checkpoint) -> str:
    if reference == DEMO_MODEL:
        return DEMO_MODEL
    if Path(reference).expanduser().exists():
        return checkpoint.path.stem if checkpoint.gguf is not None else checkpoint.path.name
    return reference


def _tokenizer_eos(tokenizer: Any) -> set[int]:
    eos = getattr(tokenizer, "eos_token_id", None)
    return {eos} if isinstance(eos, int) else set()
