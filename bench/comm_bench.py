"""The communicator's round-trip latency and all_reduce bandwidth, next to torch.distributed (gloo).

    .venv/bin/python bench/comm_bench.py --world-size 4 [--json] [--sizes 1KiB,1MiB] [--no-gloo]
        [--transport link|grpc|both]

The driver picks free ports on 127.0.0.1, starts one process per rank (this script again, with `--rank`)
and reads rank 0's figures, which it writes as JSON to a file. In each rank: round trips between ranks 0
and 1 (p50, p99), then all_reduce (sum, float32) at every size, first over meshllm, then over gloo in the
same processes. torch is imported only for the gloo part. meshllm's messages travel over its framed
links ("meshllm"), or over gRPC streams ("meshllm-grpc", `MESHLLM_LINKS=0`); `--transport both` starts
the ranks once for each, links first (gloo runs in the first).

Bandwidth is reported twice, as nccl-tests does: algbw = bytes / time, and busbw = algbw * 2 (N - 1) / N,
the rate at which each rank's link moves data in a ring all-reduce (comparable across world sizes).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from meshllm.errors import ConfigError, MeshError
from meshllm.transport.frames import LINKS_ENV

KIB, MIB = 1 << 10, 1 << 20
TRANSPORTS = {"link": "meshllm", "grpc": "meshllm-grpc"}  # --transport -> the figures' name for it
DEFAULT_SIZES = [KIB, 4 * KIB, 16 * KIB, 64 * KIB, 256 * KIB, MIB, 4 * MIB, 16 * MIB, 64 * MIB]
LATENCY_SIZES = [64, 4 * KIB]


@dataclass
class BenchConfig:
    world_size: int = 2
    sizes: list[int] = field(default_factory=lambda: list(DEFAULT_SIZES))
    round_trips: int = 1000
    gloo: bool = True
    timeout: float = 60.0
    threads: int = 1  # torch / OpenMP threads per rank process
    transports: list[str] = field(default_factory=lambda: ["link"])  # keys of TRANSPORTS, run in order


def iterations(size: int) -> int:
    """All-reduce repetitions at `size` bytes: many for small arrays, a few for large ones."""
    return int(min(200, max(3, (32 * MIB) // max(size, 1))))


def size_label(size: int) -> str:
    if size >= MIB and size % MIB == 0:
        return f"{size // MIB} MiB"
    if size >= KIB and size % KIB == 0:
        return f"{size // KIB} KiB"
    return f"{size} B"


def run_bench(config: BenchConfig) -> dict[str, Any]:
    """Run the ranks once per transport; rank 0's figures, meshllm's under each transport's name."""
    figures: dict[str, Any] = {}
    for index, transport in enumerate(config.transports):
        run = _run_ranks(config, transport, gloo=config.gloo and index == 0)
        figures["world_size"] = run["world_size"]
        figures[TRANSPORTS[transport]] = run["meshllm"]
        if "gloo" in run:
            figures["gloo"] = run["gloo"]
    return figures


def _run_ranks(config: BenchConfig, transport: str, gloo: bool) -> dict[str, Any]:
    """Start the rank processes, wait for them, and return rank 0's figures."""
    from meshllm.runtime.local_workers import free_ports

    ports = free_ports(config.world_size + 1, host="127.0.0.1")
    addresses = ",".join(f"127.0.0.1:{port}" for port in ports[:-1])
    env = {**os.environ, "OMP_NUM_THREADS": str(config.threads), "MKL_NUM_THREADS": str(config.threads)}
    env[LINKS_ENV] = "1" if transport == "link" else "0"
    with tempfile.TemporaryDirectory(prefix="meshllm-comm-bench-") as folder:
        out = Path(folder) / "figures.json"
        processes = []
        for rank in range(config.world_size):
            command = [
                sys.executable, str(Path(__file__).resolve()),
                "--rank", str(rank), "--addresses", addresses, "--gloo-port", str(ports[-1]),
                "--sizes", ",".join(map(str, config.sizes)), "--round-trips", str(config.round_trips),
                "--timeout", str(config.timeout), "--threads", str(config.threads),
                *(["--out", str(out)] if rank == 0 else []),
                *([] if gloo else ["--no-gloo"]),
            ]  # fmt: skip
            log_file = open(Path(folder) / f"rank{rank}.log", "wb")  # noqa: SIM115 (closed below)
            process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env)
            processes.append((process, log_file))
        try:
            # Generous: a healthy run takes seconds to minutes; this only ends a run that hangs.
            deadline = time.monotonic() + max(600.0, 10 * config.timeout)
            failed = _wait_all([process for process, _ in processes], deadline)
        finally:
            for process, log_file in processes:
                if process.poll() is None:
                    process.kill()
                    process.wait()
                log_file.close()
        if failed is not None:
            tail = (Path(folder) / f"rank{failed}.log").read_text(errors="replace")[-3000:]
            raise MeshError(f"comm bench: rank {failed} failed; the end of its output:\n{tail}")
        return json.loads(out.read_text())


def _wait_all(processes: list[subprocess.Popen[bytes]], deadline: float) -> int | None:
    """Wait for every process; the rank of the first that fails (the others are then stopped), or None."""
    while True:
        if time.monotonic() > deadline:
            raise MeshError("comm bench: the ranks did not finish in time; stopped them")
        running = False
        for rank, process in enumerate(processes):
            code = process.poll()
            if code is None:
                running = True
            elif code != 0:
                return rank
        if not running:
            return None
        time.sleep(0.05)


# ---- one rank ----


def _percentiles(samples: list[float]) -> dict[str, float]:
    values = np.array(samples) * 1e3
    return {"p50_ms": float(np.percentile(values, 50)), "p99_ms": float(np.percentile(values, 99))}


def _bandwidth(size: int, seconds: float, world_size: int) -> dict[str, float]:
    algbw = size / seconds / 1e9
    return {"seconds": seconds, "algbw_gbps": algbw, "busbw_gbps": algbw * 2 * (world_size - 1) / world_size}


def _measure_meshllm(args: argparse.Namespace, addresses: list[str]) -> dict[str, Any]:
    from meshllm.transport.comm import Communicator

    figures: dict[str, Any] = {"latency": {}, "all_reduce": {}}
    with Communicator(args.rank, len(addresses), addresses, timeout=args.timeout) as comm:
        for size in LATENCY_SIZES:
            message = np.zeros(size // 4, dtype=np.float32)
            samples = []
            for index in range(args.round_trips + 20):  # the first 20 warm up
                if index == 20:
                    comm.barrier()
                start = time.perf_counter()
                if args.rank == 0:
                    comm.send(message, 1)
                    comm.recv(1)
                elif args.rank == 1:
                    comm.recv(0)
                    comm.send(message, 0)
                if index >= 20:
                    samples.append(time.perf_counter() - start)
            figures["latency"][str(size)] = _percentiles(samples)
        for size in args.sizes:
            array = np.ones(size // 4, dtype=np.float32)
            comm.all_reduce(array)  # warm up
            comm.barrier()
            start = time.perf_counter()
            for _ in range(iterations(size)):
                comm.all_reduce(array)
            seconds = (time.perf_counter() - start) / iterations(size)
            figures["all_reduce"][str(size)] = _bandwidth(size, seconds, comm.world_size)
        comm.barrier()
    return figures


def _measure_gloo(args: argparse.Namespace, world_size: int) -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(args.threads)
    init = f"tcp://127.0.0.1:{args.gloo_port}"
    dist.init_process_group("gloo", init_method=init, rank=args.rank, world_size=world_size)
    figures: dict[str, Any] = {"latency": {}, "all_reduce": {}}
    try:
        for size in LATENCY_SIZES:
            message = torch.zeros(size // 4, dtype=torch.float32)
            samples = []
            for index in range(args.round_trips + 20):
                if index == 20:
                    dist.barrier()
                start = time.perf_counter()
                if args.rank == 0:
                    dist.send(message, 1)
                    dist.recv(message, 1)
                elif args.rank == 1:
                    dist.recv(message, 0)
                    dist.send(message, 0)
                if index >= 20:
                    samples.append(time.perf_counter() - start)
            figures["latency"][str(size)] = _percentiles(samples)
        for size in args.sizes:
            tensor = torch.ones(size // 4, dtype=torch.float32)
            dist.all_reduce(tensor)
            dist.barrier()
            start = time.perf_counter()
            for _ in range(iterations(size)):
                dist.all_reduce(tensor)
            seconds = (time.perf_counter() - start) / iterations(size)
            figures["all_reduce"][str(size)] = _bandwidth(size, seconds, world_size)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return figures


def rank_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="one rank of bench/comm_bench.py")
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--addresses", required=True)
    parser.add_argument("--gloo-port", type=int, required=True)
    parser.add_argument("--sizes", required=True)
    parser.add_argument("--round-trips", type=int, default=1000)
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out")
    parser.add_argument("--no-gloo", action="store_true")
    args = parser.parse_args(argv)
    args.sizes = [int(size) for size in args.sizes.split(",")]
    addresses = args.addresses.split(",")
    figures: dict[str, Any] = {"world_size": len(addresses), "meshllm": _measure_meshllm(args, addresses)}
    if not args.no_gloo:
        figures["gloo"] = _measure_gloo(args, len(addresses))
    if args.out:
        Path(args.out).write_text(json.dumps(figures))
    return 0


# ---- the command line ----

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "kb": 1 << 10,
    "kib": 1 << 10,
    "m": 1 << 20,
    "mb": 1 << 20,
    "mib": 1 << 20,
}
_UNITS |= {"g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30}


def parse_size(text: str) -> int:
    """'4096', '4KiB', '64MiB', '1g' -> bytes (binary units; a float32 array, so a multiple of 4)."""
    match = re.fullmatch(r"\s*(\d+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: write e.g. 4096, 64KiB or 16MiB")
    size = int(match.group(1)) * _UNITS[match.group(2).lower()]
    if size < 4 or size % 4:
        raise argparse.ArgumentTypeError(f"{text!r}: sizes are of float32 arrays, so a multiple of 4 bytes")
    return size


def parse_sizes(text: str) -> list[int]:
    return [parse_size(part) for part in text.split(",") if part.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=(
            "Start N rank processes on 127.0.0.1 and print the round-trip latency between ranks 0 and 1 "
            "(p50, p99) and the all_reduce bandwidth at each size, for meshllm and for torch.distributed's "
            "gloo backend in the same run. algbw = bytes / time; busbw = algbw * 2 (N - 1) / N."
        ),
    )
    parser.add_argument("--world-size", type=int, default=2, help="ranks to start (default: 2)")
    parser.add_argument("--json", action="store_true", help="also print the figures as one JSON object, last")
    parser.add_argument(
        "--sizes", type=parse_sizes, default=None, help="all_reduce sizes (default: 1KiB,4KiB,...,64MiB)"
    )
    parser.add_argument("--round-trips", type=int, default=1000, help="round trips per latency figure")
    parser.add_argument("--no-gloo", action="store_true", help="skip torch.distributed (gloo)")
    parser.add_argument("--threads", type=int, default=1, help="torch / OpenMP threads per rank (default: 1)")
    parser.add_argument("--timeout", type=float, default=60.0, help="the communicator's timeout, in seconds")
    parser.add_argument(
        "--transport",
        choices=["link", "grpc", "both"],
        default="link",
        help="meshllm's messages over its framed links (default), over gRPC streams, or both side by side",
    )
    return parser


def run(args: argparse.Namespace) -> int:
    if args.world_size < 2:
        raise ConfigError("comm bench needs --world-size 2 or more (round trips go between ranks 0 and 1)")
    config = BenchConfig(
        world_size=args.world_size,
        sizes=args.sizes or list(DEFAULT_SIZES),
        round_trips=args.round_trips,
        gloo=not args.no_gloo,
        timeout=args.timeout,
        threads=args.threads,
        transports=["link", "grpc"] if args.transport == "both" else [args.transport],
    )
    figures = run_bench(config)
    print(format_figures(figures, config))
    if args.json:
        print(json.dumps(figures))
    return 0


def format_figures(figures: dict[str, Any], config: BenchConfig) -> str:
    """The figures as two small tables: round trips, then all_reduce by size (one column group each)."""
    backends = [name for name in (*TRANSPORTS.values(), "gloo") if name in figures]
    lines = [
        f"comm bench: {figures['world_size']} ranks as local processes on 127.0.0.1, "
        f"{config.threads} thread(s) each; meshllm over its framed links, meshllm-grpc over gRPC streams; "
        "gloo is torch.distributed's gloo backend",
        "",
        f"{'round trip, rank 0 <-> 1':<28}{'p50':>10}{'p99':>10}",
    ]
    for name in backends:
        for size, latency in figures[name]["latency"].items():
            label = f"  {name} {size_label(int(size))}"
            lines.append(f"{label:<28}{latency['p50_ms']:>7.3f} ms{latency['p99_ms']:>7.3f} ms")
    group = 30  # "time ms, algbw, busbw" per backend
    lines += [
        "",
        "all_reduce (sum, float32); algbw = bytes / time, busbw = algbw * 2 (N - 1) / N, in GB/s",
        f"{'':>10}" + "".join(f"{name:>{group - 6}}{'':6}" for name in backends),
        f"{'size':>10}" + f"{'time':>12}{'algbw':>9}{'busbw':>9}" * len(backends),
    ]
    for size in config.sizes:
        row = f"{size_label(size):>10}"
        for name in backends:
            cell = figures[name]["all_reduce"][str(size)]
            row += f"{cell['seconds'] * 1e3:>9.2f} ms{cell['algbw_gbps']:>9.3f}{cell['busbw_gbps']:>9.3f}"
        lines.append(row)
    return "\n".join(line.rstrip() for line in lines)


def main(argv: list[str] | None = None) -> int:
    """The driver; with `--rank`, one rank (the processes the driver starts)."""
    argv = sys.argv[1:] if argv is None else argv
    if "--rank" in argv:
        return rank_main(argv)
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except MeshError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
