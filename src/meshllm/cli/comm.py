"""`meshllm comm ...`: the communicator's command line.

    meshllm comm bench --world-size 4 [--json]

starts N local rank processes and prints round-trip latency and all_reduce bandwidth, next to
torch.distributed's gloo backend on the same sizes in the same run (see comm_bench.py).
"""

from __future__ import annotations

import argparse
import re
from typing import Any

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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(dest="comm_command", metavar="COMMAND", required=True)
    bench = commands.add_parser(
        "bench",
        help="measure latency and all_reduce bandwidth of N local ranks, next to torch.distributed (gloo)",
        description=(
            "Start N rank processes on 127.0.0.1 and print the round-trip latency between ranks 0 and 1 "
            "(p50, p99) and the all_reduce bandwidth at each size, for meshllm and for torch.distributed's "
            "gloo backend in the same run. algbw = bytes / time; busbw = algbw * 2 (N - 1) / N."
        ),
    )
    bench.add_argument("--world-size", type=int, default=2, help="ranks to start (default: 2)")
    bench.add_argument("--json", action="store_true", help="also print the figures as one JSON object, last")
    bench.add_argument(
        "--sizes", type=parse_sizes, default=None, help="all_reduce sizes (default: 1KiB,4KiB,...,64MiB)"
    )
    bench.add_argument("--round-trips", type=int, default=1000, help="round trips per latency figure")
    bench.add_argument("--no-gloo", action="store_true", help="skip torch.distributed (gloo)")
    bench.add_argument("--threads", type=int, default=1, help="torch / OpenMP threads per rank (default: 1)")
    bench.add_argument("--timeout", type=float, default=60.0, help="the communicator's timeout, in seconds")


def run(args: argparse.Namespace) -> int:
    import json

    from meshllm.errors import ConfigError
    from meshllm.transport.comm_bench import DEFAULT_SIZES, BenchConfig, run_bench

    if args.comm_command != "bench":  # argparse allows only known commands; kept for clarity
        raise ConfigError(f"unknown comm command {args.comm_command!r}")
    if args.world_size < 2:
        raise ConfigError("comm bench needs --world-size 2 or more (round trips go between ranks 0 and 1)")
    config = BenchConfig(
        world_size=args.world_size,
        sizes=args.sizes or list(DEFAULT_SIZES),
        round_trips=args.round_trips,
        gloo=not args.no_gloo,
        timeout=args.timeout,
        threads=args.threads,
    )
    figures = run_bench(config)
    print(format_figures(figures, config))
    if args.json:
        print(json.dumps(figures))
    return 0


def format_figures(figures: dict[str, Any], config: Any) -> str:
    """The figures as two small tables: round trips, then all_reduce by size (one column group each)."""
    from meshllm.transport.comm_bench import size_label

    backends = [name for name in ("meshllm", "gloo") if name in figures]
    lines = [
        f"meshllm comm bench: {figures['world_size']} ranks as local processes on 127.0.0.1, "
        f"{config.threads} thread(s) each; gloo is torch.distributed's gloo backend",
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
