"""`meshllm serve`: a cluster on this machine (or with given workers) behind the OpenAI-compatible API.

By default the coordinator computes the first layers itself and starts `--stages - 1` local worker
processes for the rest; they are its children, stopped by pid when serve stops (Ctrl-C, SIGTERM, an
error), and on Linux the kernel stops them too should serve itself be killed.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING, Literal

from meshllm.cli.worker import add_cores_argument, add_kv_memory_argument, add_tls_arguments
from meshllm.defaults import (
    AUTO_DTYPE,
    DEFAULT_API_PORT,
    DEFAULT_GROUP_SIZE,
    DTYPES,
    ENGINES,
    QUANTIZE_MODES,
    SHARED_CORES_ENV,
    SHARED_STAGES,
)

if TYPE_CHECKING:  # heavy or runtime modules load inside run() only
    import asyncio
    import socket

    from meshllm.runtime.coordinator import Coordinator
    from meshllm.runtime.coordinator_config import CoordinatorConfig, WorkerAddress
    from meshllm.runtime.engine_client import EngineClient
    from meshllm.runtime.local_workers import LocalWorkers
    from meshllm.transport.tls import TlsFiles


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default="demo", help="local folder, Hugging Face hub id, or 'demo' (default)"
    )
    parser.add_argument(
        "--stages",
        type=int,
        default=2,
        help="pipeline stages on this machine: this process plus N-1 local workers it starts (default 2)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="compute threads of each stage on this machine (default: its cores divided between them); "
        "more threads than cores in all makes idle threads sleep rather than spin (OMP_WAIT_POLICY=passive)",
    )
    add_cores_argument(parser, "this process and the workers it starts")
    parser.add_argument(
        "--shared-stages",
        choices=SHARED_STAGES,
        default=SHARED_STAGES[0],
        help="how stages on the same cores (several on one machine) serve many streams: 'turns' (default), "
        "one step at a time with the whole batch on every core; 'together', a micro-batch each at once on "
        "their share of the cores; 'auto', whichever the start's prediction says is faster",
    )
    parser.add_argument(
        "--threads-alone",
        type=int,
        default=None,
        metavar="N",
        help="compute threads for a step alone in the pipeline (one stream), the other stages idle "
        "meanwhile (default: the machine's cores when several stages share it, else --threads)",
    )
    parser.add_argument(
        "--workers",
        default=None,
        metavar="NAME=HOST:PORT,...",
        help="use these running workers, in chain order, instead of starting local ones",
    )
    parser.add_argument(
        "--no-local-stage", action="store_true", help="the coordinator computes no layers (workers do all)"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address the API listens on (default 127.0.0.1)")
    parser.add_argument(
        "--port", type=int, default=DEFAULT_API_PORT, help=f"API port (default {DEFAULT_API_PORT})"
    )
    parser.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 routes")
    parser.add_argument("--token", default=None, help="cluster token for the workers' gRPC calls")
    parser.add_argument("--token-file", default=None, help="read the cluster token from this file")
    add_tls_arguments(parser)
    parser.add_argument(
        "--dtype",
        default=AUTO_DTYPE,
        choices=(AUTO_DTYPE, *DTYPES),
        help="weights and activations (default auto: the model's own, as its config.json says, else float32)",
    )
    add_quantize_arguments(parser)
    parser.add_argument(
        "--device-quantize",
        default=None,
        metavar="NAME=MODE,...",
        help="a device's own quantization, over --quantize (e.g. coordinator=int8,w1=int4)",
    )
    parser.add_argument(
        "--engine",
        default=None,
        choices=ENGINES,
        help="default: mlx on Apple silicon, torch on a GPU, else ggml where installed",
    )
    parser.add_argument(
        "--served-model-name", default=None, help="the model id clients send (default: derived)"
    )
    parser.add_argument(
        "--name", default="coordinator", help="this device's name in the plan, logs and /distributed/gpu-info"
    )
    parser.add_argument(
        "--step-timeout",
        type=float,
        default=30.0,
        help="seconds a pipeline step may take before its sequences fail (default 30)",
    )
    parser.add_argument(
        "--replay-timeout",
        type=float,
        default=60.0,
        help="seconds sequences whose stage died wait for it to come back and go on (default 60)",
    )
    parser.add_argument(
        "--replan-after",
        type=float,
        default=20.0,
        metavar="SECONDS",
        help="seconds a worker may stay unreachable before its layers are planned over the other devices "
        "(default 20; 0: never, wait for it)",
    )
    parser.add_argument(
        "--no-restart",
        action="store_true",
        help="do not start a local worker that died again (its layers are planned over the others)",
    )
    parser.add_argument(
        "--weights",
        choices=("cluster", "own"),
        default=None,
        help="cluster: workers take their layers' weights from this process (the default with --workers); "
        "own: every worker reads --model itself (the default for local workers)",
    )
    parser.add_argument(
        "--weights-port",
        type=int,
        default=None,
        help="port the workers fetch weights from (default: the API port + 1)",
    )
    parser.add_argument(
        "--weights-address",
        default=None,
        metavar="HOST:PORT",
        help="where the workers reach that port (default: --host, or this machine's name for 0.0.0.0)",
    )
    parser.add_argument(
        "--device-model",
        default=None,
        metavar="NAME=PATH,...",
        help="workers with their own copy of the model, at PATH there; they fetch no weights",
    )
    parser.add_argument(
        "--worker-status",
        default=None,
        metavar="NAME=PATH,...",
        help="status files of supervised workers on this machine: their exits show in /health (cluster start sets it)",
    )
    parser.add_argument(
        "--memory",
        default=None,
        metavar="NAME=GB,...",
        help="memory the layer plan may use per device, in GB (e.g. coordinator=2,worker1=4)",
    )
    add_kv_memory_argument(parser)  # here: the local stage's and each local worker's
    parser.add_argument(
        "--plan-only",
        action="store_true",
        help="measure the devices and links, print the plan and its predicted speed, and exit (loads nothing)",
    )


def add_quantize_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--quantize",
        choices=QUANTIZE_MODES,
        default=None,
        help="hold the linear layers as int8 (per channel) or int4 (per group); default: as stored",
    )
    parser.add_argument(
        "--quantize-group",
        type=int,
        default=DEFAULT_GROUP_SIZE,
        metavar="N",
        help=f"inputs per int4 scale (default {DEFAULT_GROUP_SIZE})",
    )


def _named_items(spec: str | None) -> list[tuple[str, str, str]]:
    """'a=x,b=y' -> [('a=x', 'a', 'x'), ('b=y', 'b', 'y')], empty items left out."""
    items = [item.strip() for item in (spec or "").split(",") if item.strip()]
    return [(item, *item.partition("=")[::2]) for item in items]


def parse_workers(spec: str | None) -> list[WorkerAddress]:
    """'w1=host:port,w2=host:port' -> WorkerAddress list, in chain order."""
    from meshllm.errors import ConfigError
    from meshllm.runtime.coordinator_config import WorkerAddress

    workers = []
    for item, name, address in _named_items(spec):
        host, _, port = address.rpartition(":")
        if not name or not host or not port.isdigit():
            raise ConfigError(f"--workers: '{item}' is not NAME=HOST:PORT (e.g. mini2=192.168.1.12:50051)")
        workers.append(WorkerAddress(name=name, address=address))
    return workers


def parse_worker_status(spec: str | None) -> dict[str, str]:
    """'w1=/path/w1.json,w2=...' -> {name: path}."""
    from meshllm.errors import ConfigError

    files = {}
    for item, name, path in _named_items(spec):
        if not name or not path:
            raise ConfigError(
                f"--worker-status: '{item}' is not NAME=PATH (e.g. w1=.meshllm/c/status/w1.json)"
            )
        files[name] = path
    return files


def parse_device_quantize(spec: str | None) -> dict[str, str]:
    """'coordinator=int8,w1=int4' -> {name: mode}."""
    from meshllm.errors import ConfigError

    modes = {}
    for item, name, mode in _named_items(spec):
        if not name or mode not in QUANTIZE_MODES:
            raise ConfigError(
                f"--device-quantize: '{item}' is not NAME=MODE with MODE one of {', '.join(QUANTIZE_MODES)}"
            )
        modes[name] = mode
    return modes


def parse_device_models(spec: str | None) -> dict[str, str]:
    """'w1=/models/qwen,w2=Qwen/Qwen3-0.6B' -> {name: model}."""
    from meshllm.errors import ConfigError

    models = {}
    for item, name, model in _named_items(spec):
        if not name or not model:
            raise ConfigError(f"--device-model: '{item}' is not NAME=PATH (e.g. mini2=/models/qwen3)")
        models[name] = model
    return models


def weights_addresses(
    args: argparse.Namespace, has_workers: bool, local_workers: bool
) -> tuple[str | None, str | None]:
    """(where the weights service listens, what the workers dial), or (None, None) when the workers
    read the model themselves."""
    import socket

    from meshllm.errors import ConfigError

    mode = args.weights or ("own" if local_workers or not has_workers else "cluster")
    if mode == "own":
        return None, None
    port = args.weights_port or args.port + 1
    if not 1 <= port <= 65535 or port == args.port:
        raise ConfigError(f"--weights-port must be a port (1 to 65535) other than the API's, got {port}")
    listen = f"{args.host}:{port}"
    if args.weights_address:
        host, _, given_port = args.weights_address.rpartition(":")
        if not host or not given_port.isdigit():
            raise ConfigError(
                f"--weights-address: {args.weights_address!r} is not HOST:PORT (e.g. mini1.local:{port})"
            )
        return listen, args.weights_address
    host = socket.gethostname() if args.host in ("0.0.0.0", "::") else args.host
    return listen, f"{host}:{port}"


def parse_memory(spec: str | None) -> dict[str, int] | None:
    """'coordinator=2,worker1=4.5' (GB) -> {name: bytes}."""
    from meshllm.errors import ConfigError

    if not spec:
        return None
    overrides = {}
    for item in spec.split(","):
        name, _, gigabytes = item.strip().partition("=")
        try:
            value = float(gigabytes)
        except ValueError:
            value = -1.0
        if not name or value <= 0:
            raise ConfigError(f"--memory: '{item.strip()}' is not NAME=GB with GB > 0 (e.g. worker1=4)")
        overrides[name] = int(value * 1e9)
    return overrides


def kv_share(stages_here: int) -> float | None:
    """Without --kv-memory, the stages on this machine split the default share of its free memory
    between them (each would otherwise count all of it); None (the stage's own default) when alone."""
    from meshllm.runtime.stage_host import KV_MEMORY_SHARE

    return KV_MEMORY_SHARE / stages_here if stages_here > 1 else None


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def stage_threads(requested: int | None, stages_here: int, cores: int) -> tuple[int, bool]:
    """Compute threads of each stage on this machine (`--threads`, else the cores divided between the
    stages), and whether they outnumber the cores in all."""
    from meshllm.errors import ConfigError

    if requested is not None and requested < 1:
        raise ConfigError(f"--threads must be at least 1, got {requested}")
    stages_here = max(1, stages_here)
    threads = requested or max(1, cores // stages_here)
    return threads, threads * stages_here > cores


def run(args: argparse.Namespace) -> int:
    from meshllm.cli.worker import pin_to_cores, read_token
    from meshllm.errors import ConfigError
    from meshllm.log import setup_logging
    from meshllm.runtime.local_workers import LocalWorkers
    from meshllm.server.launch import bind_socket

    if args.cores is not None:  # before any library starts its threads; the workers started here inherit it
        pin_to_cores(args.cores)
    setup_logging(args.name)
    workers = parse_workers(args.workers)
    parse_device_models(args.device_model)  # a bad item fails before anything starts
    tls = _worker_tls(args, workers)
    memory_overrides = parse_memory(args.memory)
    if args.stages < 1:
        raise ConfigError(f"--stages must be at least 1, got {args.stages}")
    if args.step_timeout <= 0:
        raise ConfigError(f"--step-timeout must be positive, got {args.step_timeout}")
    if args.replan_after < 0:
        raise ConfigError(f"--replan-after must not be negative, got {args.replan_after}")
    local_stage = not args.no_local_stage
    n_local_workers = 0 if workers else args.stages - int(local_stage)
    token = read_token(args.token, args.token_file)
    if token is None and n_local_workers:
        import secrets

        token = secrets.token_urlsafe(16)  # local workers still refuse callers that are not this process
    threads, oversubscribed = stage_threads(args.threads, n_local_workers + int(local_stage), _cores())
    if oversubscribed:
        # the stages' threads outnumber the cores: one waiting for work must give its core to another
        os.environ.setdefault("OMP_WAIT_POLICY", "passive")
    kv_memory = args.kv_memory if args.kv_memory is not None else kv_share(n_local_workers + int(local_stage))
    if local_stage:
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    # Stages that share this machine split its cores while they all compute; a step alone in the
    # pipeline (one stream) may take every core, the other stages being idle meanwhile.
    stages_here = n_local_workers + int(local_stage)
    if args.threads_alone is not None and args.threads_alone < 1:
        raise ConfigError(f"--threads-alone must be at least 1, got {args.threads_alone}")
    alone = args.threads_alone or (_cores() if stages_here > 1 and threads < _cores() else None)
    if alone and stages_here > 1:  # for this process and the local workers it starts
        for name, value in SHARED_CORES_ENV.items():
            os.environ.setdefault(name, value)
    args.stage_threads, args.threads_alone = threads, alone

    # Before anything slow: a busy port fails at once (a plan serves nothing, so it takes no port).
    sock = None if args.plan_only else bind_socket(args.host, args.port)
    _print_banner(args.model)
    local_workers = LocalWorkers()
    try:
        if n_local_workers:
            workers = local_workers.spawn(
                n_local_workers,
                token=token,
                threads=threads,
                kv_memory=kv_memory,
                engine=args.engine,
                threads_alone=alone,
            )
        from meshllm.cli import event_loop

        args.kv_memory = kv_memory  # the local stage's, as the local workers'
        if sock is None:
            return event_loop.run(
                _plan_only(args, workers, local_workers, token, tls, memory_overrides, threads)
            )
        return event_loop.run(
            _serve(args, sock, workers, local_workers, token, tls, memory_overrides, threads)
        )
    except KeyboardInterrupt:
        return 130
    finally:
        local_workers.stop()
        if sock is not None:
            sock.close()


def _worker_tls(args: argparse.Namespace, workers: list[WorkerAddress]) -> TlsFiles | None:
    """The certificates for the links to --workers. Local workers (--stages) are on loopback, plaintext."""
    from meshllm.cli.worker import read_tls
    from meshllm.config import is_loopback
    from meshllm.errors import ConfigError

    if not workers and (args.tls_ca or args.tls_cert or args.tls_key):
        raise ConfigError(
            "--tls-ca, --tls-cert and --tls-key are for the links to --workers; the local workers of "
            "--stages listen on 127.0.0.1 only and are reached in plaintext"
        )
    remote = [
        f"{w.name}={w.address}" for w in workers if not is_loopback(w.address.rpartition(":")[0].strip("[]"))
    ]
    return read_tls(args, remote, "serve: --workers")


def _print_banner(model: str) -> None:
    from meshllm import __version__

    if model == "demo":
        note = "random weights: its output is noise; pass --model <hub id or folder> for a real model"
        print(f"meshllm {__version__} · model demo ({note})", flush=True)
    else:
        print(f"meshllm {__version__} · model {model}", flush=True)


def _config(
    args: argparse.Namespace,
    workers: list[WorkerAddress],
    token: str | None,
    tls: TlsFiles | None,
    memory_overrides: dict[str, int] | None,
    local_workers: bool = False,
) -> CoordinatorConfig:
    from meshllm.runtime.coordinator_config import CoordinatorConfig

    weights_listen, weights_address = weights_addresses(args, bool(workers), local_workers)
    return CoordinatorConfig(
        weights_listen=weights_listen,
        weights_address=weights_address,
        device_models=parse_device_models(args.device_model),
        model=args.model,
        workers=tuple(workers),
        local_stage=not args.no_local_stage,
        dtype=args.dtype,
        quantize=args.quantize,
        group_size=args.quantize_group,
        device_quantize=parse_device_quantize(args.device_quantize),
        engine=args.engine,
        token=token,
        tls=tls,
        memory_overrides=memory_overrides or {},
        step_timeout=args.step_timeout,
        replay_timeout=args.replay_timeout,
        replan_after=args.replan_after or None,
        name=args.name,
        kv_memory=args.kv_memory,
        threads=args.stage_threads,
        threads_alone=args.threads_alone,
        shared_stages=args.shared_stages,
    )


async def _plan_only(
    args: argparse.Namespace,
    workers: list[WorkerAddress],
    local_workers: LocalWorkers,
    token: str | None,
    tls: TlsFiles | None,
    memory_overrides: dict[str, int] | None,
    threads: int,
) -> int:
    """`--plan-only`: the plan and its predicted speed, printed; nothing is loaded or served."""
    from meshllm.runtime.startup import forecast

    await local_workers.wait_healthy(token)
    if not args.no_local_stage:
        import torch

        torch.set_num_threads(threads)
    for line in await forecast(_config(args, workers, token, tls, memory_overrides)):
        print(line, flush=True)
    return 0


async def _serve(
    args: argparse.Namespace,
    sock: socket.socket,
    workers: list[WorkerAddress],
    local_workers: LocalWorkers,
    token: str | None,
    tls: TlsFiles | None,
    memory_overrides: dict[str, int] | None,
    threads: int,
) -> int:
    import asyncio
    import signal

    from meshllm.runtime.coordinator import Coordinator
    from meshllm.runtime.supervisor import watch_reports

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_signal() -> None:
        if stop.is_set():  # a second Ctrl-C: stop now, without waiting for open streams
            print("stopping now", file=sys.stderr, flush=True)
            local_workers.stop(grace=0.0)
            os._exit(130)
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal)

    from meshllm.cli.progress import LoadBoard

    config = _config(args, workers, token, tls, memory_overrides, bool(local_workers.workers))

    async def start() -> Coordinator:
        await local_workers.wait_healthy(token)
        if not args.no_local_stage:
            import torch

            torch.set_num_threads(threads)
        board = LoadBoard(sys.stderr)
        try:
            return await Coordinator.start(config, on_load=board.update)
        finally:
            board.close()

    starting = asyncio.create_task(start())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():
        starting.cancel()
        print("stopped before the API was ready", file=sys.stderr, flush=True)
        return 130
    coordinator = starting.result()  # a failed start raises its MeshError: `meshllm` prints it
    # A local worker that dies is started again (with backoff); the coordinator then loads it again.
    supervising = (
        None
        if args.no_restart
        else asyncio.create_task(local_workers.supervise(on_exit=coordinator.monitor.note))
    )
    # Workers run by `meshllm supervise` on this machine (a cluster): their exits are noted the same way.
    reports = asyncio.create_task(
        watch_reports(parse_worker_status(args.worker_status), coordinator.monitor.note)
    )
    try:
        print(_plan_line(coordinator), flush=True)
        return await _serve_api(args, sock, coordinator, stopping)
    finally:
        if supervising is not None:
            supervising.cancel()
        reports.cancel()
        stopping.cancel()
        await coordinator.close()


async def _serve_api(
    args: argparse.Namespace,
    sock: socket.socket,
    coordinator: Coordinator,
    stopping: asyncio.Task[Literal[True]],
) -> int:
    import asyncio

    from meshllm.server.app import build_app
    from meshllm.server.launch import ApiServer

    app = build_app(coordinator, served_model_name=args.served_model_name, api_key=args.api_key)
    server = ApiServer(app)
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started and not serving.done():
        await asyncio.sleep(0.05)
    if serving.done():
        serving.result()
        return 1
    host, port = sock.getsockname()[:2]
    print(f"API ready at http://{host}:{port}/v1  (Ctrl-C stops everything)", flush=True)
    await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
    server.should_exit = True
    # Ending every sequence now ends open streams with an error event and [DONE] instead of a cut.
    await coordinator.close()
    await serving
    print("stopped", file=sys.stderr, flush=True)
    return 0


def _plan_line(client: EngineClient) -> str:
    parts = []
    for device in client.devices_snapshot():
        start, end = device.layers
        where = "on this process" if device.address == "local" else f"on {device.name} {device.address}"
        parts.append(f"stage {device.device_id} layers [{start}, {end}) {where}")
    return "plan: " + " · ".join(parts)
