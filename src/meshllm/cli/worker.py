"""`meshllm worker`: serve a layer range over gRPC for a coordinator."""

from __future__ import annotations

import argparse
import os
import socket
from typing import TYPE_CHECKING

from meshllm.defaults import DEFAULT_STAGE_PORT, ENGINES, QUANTIZE_MODES, TOKEN_ENV

if TYPE_CHECKING:
    from meshllm.transport.tls import TlsFiles


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument(
        "--port",
        type=int,
        default=DEFAULT_STAGE_PORT,
        help=f"port to listen on (default {DEFAULT_STAGE_PORT})",
    )
    parser.add_argument(
        "--step-port",
        type=parse_step_port,
        default=0,
        metavar="PORT",
        help="port of the same host taking step links, the fast path of activations between stages "
        "(default: any free port; give one to open it in a firewall; 'off': steps go over --port's gRPC)",
    )
    parser.add_argument("--name", default=None, help="device name in logs and errors (default: host:port)")
    parser.add_argument(
        "--token",
        default=None,
        help=f"cluster token every call must carry (default: ${TOKEN_ENV}; a file keeps it out of ps)",
    )
    parser.add_argument("--token-file", default=None, help="read the cluster token from this file")
    add_tls_arguments(parser)
    parser.add_argument(
        "--engine",
        choices=ENGINES,
        default=None,
        help="default: mlx on Apple silicon, torch on a GPU, else ggml where installed",
    )
    parser.add_argument("--device", default=None, help="torch device: auto, cpu, cuda, cuda:1, mps")
    parser.add_argument("--threads", type=int, default=None, help="compute threads (default: all cores)")
    add_cores_argument(parser, "the process")
    parser.add_argument(
        "--threads-alone",
        type=int,
        default=None,
        metavar="N",
        help="compute threads for a step that is alone in the pipeline, where stages share this machine "
        "and the others are idle meanwhile (default: --threads; `serve --stages N` gives its own workers "
        "the machine's cores, and starts them with GOMP_SPINCOUNT=10000 so that idle OpenMP threads give "
        "the cores back soon: do the same for workers started by hand)",
    )
    parser.add_argument(
        "--quantize",
        choices=QUANTIZE_MODES,
        default=None,
        help="hold this device's linear layers as int8 or int4, whatever the coordinator asks",
    )
    parser.add_argument(
        "--weights-cache",
        default=None,
        metavar="DIR",
        help="where weights received from the coordinator are kept "
        "(default: $MESHLLM_WEIGHTS_CACHE, else ~/.cache/meshllm/weights)",
    )
    add_kv_memory_argument(parser)


def parse_step_port(value: str) -> int | None:
    """--step-port: a port number, 0 for any free port, or "off" (None)."""
    if value.strip().lower() == "off":
        return None
    try:
        port = int(value)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{value!r} is not a port (0-65535) or 'off'")
    return port


def add_cores_argument(parser: argparse.ArgumentParser, who: str) -> None:
    parser.add_argument(
        "--cores",
        type=parse_cores,
        default=None,
        metavar="LIST",
        help=f"run on these CPU cores only, such as 0-7 or 0-3,8-11 (Linux; default: every core {who} may "
        "use, the default threads counting these); stages on cores of their own, such as one per socket "
        "of a two-socket server, compute at once, where stages on the same cores may take turns",
    )


def parse_cores(text: str) -> frozenset[int]:
    """--cores: '0-3,8' -> {0, 1, 2, 3, 8}; argparse shows the error's message."""
    from meshllm.devices import parse_cores as parse

    try:
        return parse(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def pin_to_cores(cores: frozenset[int]) -> None:
    """Run this process on `cores` only; a ConfigError naming --cores when they cannot be had."""
    from meshllm.devices import format_cores
    from meshllm.errors import ConfigError

    if not hasattr(os, "sched_setaffinity"):
        raise ConfigError("--cores: this system does not let a process choose its cores (Linux does)")
    try:
        os.sched_setaffinity(0, cores)
    except OSError as error:
        raise ConfigError(
            f"--cores {format_cores(cores)}: {error.strerror} "
            f"(this process may use cores {format_cores(os.sched_getaffinity(0))})"
        ) from None


def add_kv_memory_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--kv-memory",
        type=parse_kv_memory,
        default=None,
        metavar="SIZE",
        help="memory this stage's KV caches may take: a size such as 512M or 2G, or a share of the memory "
        "free once the weights are loaded such as 40%% (default: 80%%); the coordinator starts sequences "
        "only while their caches fit",
    )


_SIZE_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def parse_kv_memory(text: str) -> int | float:
    """A size in bytes (an int, see `parse_size`), or a share of free memory ('40%' -> 0.4, a float)."""
    if text.strip().endswith("%"):
        try:
            percent = float(text.strip()[:-1])
        except ValueError:
            percent = -1.0
        if not 0 < percent <= 100:
            raise argparse.ArgumentTypeError(f"'{text}' is not a share between 0% and 100%")
        return percent / 100
    return parse_size(text)


def parse_size(text: str) -> int:
    """'2G', '512M', '64K' or '1000000' (bytes) -> bytes; argparse shows the ValueError's message."""
    number = text.strip().upper().removesuffix("B")
    unit = number[-1:] if number[-1:] in _SIZE_UNITS else ""
    try:
        value = float(number[: len(number) - len(unit)])
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"'{text}' is not a size such as 512M or 2G")
    return int(value * _SIZE_UNITS[unit])


def add_tls_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tls-ca", default=None, metavar="PEM", help="the cluster CA: peers need a certificate it signed"
    )
    parser.add_argument(
        "--tls-cert", default=None, metavar="PEM", help="this device's certificate (signed by --tls-ca)"
    )
    parser.add_argument("--tls-key", default=None, metavar="PEM", help="this device's private key")
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="plaintext gRPC beyond loopback, without TLS (only on a network you trust)",
    )


def read_tls(args: argparse.Namespace, remote: list[str], what: str) -> TlsFiles | None:
    """The certificates the flags name (None: plaintext). Plaintext beyond loopback (`remote` names the
    addresses that are not) needs --insecure; --insecure with certificates is a contradiction."""
    from meshllm.errors import ConfigError
    from meshllm.transport.tls import TlsFiles

    tls = TlsFiles.from_options(args.tls_ca, args.tls_cert, args.tls_key)
    if tls is not None and args.insecure:
        raise ConfigError("--insecure turns TLS off: give it or --tls-ca/--tls-cert/--tls-key, not both")
    if tls is None and remote and not args.insecure:
        raise ConfigError(
            f"{what} {', '.join(remote)} without TLS: the cluster token and the activations would cross the "
            "network in plaintext; give --tls-ca, --tls-cert and --tls-key (`meshllm cluster start` makes "
            "them), or --insecure on a network you trust"
        )
    return tls


def read_token(token: str | None, token_file: str | None) -> str | None:
    from meshllm.errors import ConfigError

    if token_file:
        try:
            return open(os.path.expanduser(token_file)).read().strip() or None
        except OSError as error:
            raise ConfigError(f"--token-file {token_file}: {error.strerror}") from None
    return token or os.environ.get(TOKEN_ENV) or None


def run(args: argparse.Namespace) -> int:
    if args.cores is not None:  # before any library starts its threads
        pin_to_cores(args.cores)
        if not args.threads:
            args.threads = len(args.cores)
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    from meshllm.cli import event_loop
    from meshllm.config import is_loopback
    from meshllm.errors import ConfigError
    from meshllm.log import setup_logging

    name = args.name or f"{socket.gethostname()}:{args.port}"
    setup_logging(f"worker {name}")
    remote = [] if is_loopback(args.host) else [f"{args.host}:{args.port}"]
    tls = read_tls(args, remote, "worker: listening on")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from meshllm.runtime.stage_host import LocalStageHost
    from meshllm.transport.stage_service import serve_stage

    token = read_token(args.token, args.token_file)
    from pathlib import Path

    weights_cache = Path(args.weights_cache).expanduser() if args.weights_cache else None
    host = LocalStageHost(
        name,
        engine=args.engine,
        device=args.device,
        quantize=args.quantize,
        kv_memory=args.kv_memory,
        token=token,
        tls=tls,
        weights_cache=weights_cache,
    )
    if args.threads_alone is not None:
        if args.threads_alone < 1:
            raise ConfigError(f"--threads-alone must be at least 1, got {args.threads_alone}")
        host.set_threads(args.threads or os.cpu_count() or 1, args.threads_alone)
    try:
        event_loop.run(
            serve_stage(host, f"{args.host}:{args.port}", token=token, tls=tls, step_port=args.step_port)
        )
    except OSError as error:
        raise ConfigError(f"worker {name}: {error}") from None
    except KeyboardInterrupt:
        pass
    return 0
