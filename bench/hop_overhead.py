"""What a pipeline hop costs: the same checkpoint as 1 in-process stage, then 2 and 4 stages over loopback.

Two figures per hop:
- transport per hop: for every decode step, the time the coordinator waited on the remote chain minus
  the compute time each remote stage reports for it (timed on the stage's compute thread, so handing the
  step to that thread and back counts as transport), divided by the remote stages (each one adds a link
  down and a relay back up); the median over the steps. Compute noise does not enter it.
- by difference: (ms per token with N stages - ms per token with 1 stage) / (N - 1), which also counts
  any change in the stages' compute; noisy where a token costs far more than a hop.
Both are measured with step links (the default: over the local sockets of the workers, on Linux), with
step links over loopback TCP (`MESHLLM_LOCAL_LINKS=0`: what links between machines take) and with gRPC's
Forward stream (`MESHLLM_LINKS=0`); decode throughput with 8 concurrent sequences is reported beside them.
The coordinator runs on the event loop `meshllm serve` runs on (uvloop's where installed).

    .venv/bin/python bench/hop_overhead.py [--shape bench|0.6b] [--tokens 64] [--json] [--plot FILE.png]

`--shape 0.6b` measures the Qwen3-0.6B shape (hidden 1024, bfloat16, the whole model: slow on two cores,
so the by-difference figure is mostly noise there; the transport figure is what to read).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

from bench_common import SPEC, shape_checkpoint

from meshllm.cli import event_loop  # noqa: E402
from meshllm.models.tiny import make_checkpoint  # noqa: E402
from meshllm.runtime.coordinator import Coordinator  # noqa: E402
from meshllm.runtime.coordinator_config import CoordinatorConfig, WorkerAddress  # noqa: E402
from meshllm.runtime.engine_client import GenerateRequest  # noqa: E402
from meshllm.runtime.local_workers import LocalWorkers  # noqa: E402
from meshllm.step import SamplingParams  # noqa: E402
from meshllm.transport.frames import LINKS_ENV, LOCAL_LINKS_ENV  # noqa: E402

# The environment of the coordinator for each transport: links (over the workers' local sockets where
# the machine has them, Linux), links over loopback TCP, gRPC's Forward stream.
TRANSPORTS = {
    "link": {LINKS_ENV: "1", LOCAL_LINKS_ENV: "1"},
    "tcp": {LINKS_ENV: "1", LOCAL_LINKS_ENV: "0"},
    "grpc": {LINKS_ENV: "0", LOCAL_LINKS_ENV: "1"},
}


async def measure(path: Path, workers: list[WorkerAddress], tokens: int, dtype: str) -> dict[str, float]:
    coordinator = await Coordinator.start(
        CoordinatorConfig(model=str(path), workers=tuple(workers), dtype=dtype)
    )
    names = {worker.name for worker in workers}
    steps: list[list[float]] = []  # [remote chain seconds, remote compute seconds] per step

    def listener(stage: str, seconds: float) -> None:
        if stage == "remote chain":
            steps.append([seconds, 0.0])
        elif stage in names and steps:
            steps[-1][1] += seconds

    coordinator.add_step_listener(listener)
    prompt = list(range(3, 35))
    try:

        async def decode(n: int) -> None:
            handle = coordinator.generate(GenerateRequest(prompt, SamplingParams(), n, ignore_eos=True))
            async for _ in handle:
                pass

        await decode(8)  # warm up every stage
        steps.clear()
        started = time.perf_counter()
        await decode(tokens)
        single = time.perf_counter() - started
        transport = [chain - compute for chain, compute in steps[2:]]  # decode steps, not the prompt
        started = time.perf_counter()
        await asyncio.gather(*(decode(tokens) for _ in range(8)))
        batched = time.perf_counter() - started
    finally:
        await coordinator.close()
    figures = {
        "ms_per_token": single / tokens * 1000,
        "tokens_per_s": tokens / single,
        "batch8_tokens_per_s": 8 * tokens / batched,
    }
    if workers and transport:
        figures["transport_per_hop_ms"] = statistics.median(transport) * 1000 / len(workers)
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", choices=("bench", "0.6b"), default="bench", help="the checkpoint measured")
    parser.add_argument("--tokens", type=int, default=64, help="decode tokens per sequence")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    parser.add_argument(
        "--plot", type=Path, metavar="FILE.png", help="also draw the figures to FILE.png (needs matplotlib)"
    )
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    results: dict[str, dict[str, dict[str, float]]] = {name: {} for name in TRANSPORTS}
    workers = LocalWorkers()
    dtype = "bfloat16" if args.shape == "0.6b" else "float32"
    with tempfile.TemporaryDirectory() as folder:
        if args.shape == "0.6b":
            path = shape_checkpoint("0.6b")
            described = "Qwen3-0.6B shape (28 layers, hidden 1024, vocab 151936), bfloat16"
        else:
            path = make_checkpoint(Path(folder) / "bench", arch="qwen3", spec=SPEC)
            described = f"qwen3-shaped, {SPEC.num_hidden_layers} layers, hidden {SPEC.hidden_size}, float32"
        try:
            addresses = workers.spawn(3, token=None, threads=1, output=subprocess.DEVNULL)
            # workers that link to each other over TCP too (and take no link on a local socket)
            tcp_only = {LOCAL_LINKS_ENV: "0"}
            tcp_addresses = workers.spawn(3, token=None, threads=1, output=subprocess.DEVNULL, env=tcp_only)
            asyncio.run(workers.wait_healthy(token=None))
            for n_stages in (1, 2, 4):
                for transport, environment in TRANSPORTS.items():
                    if n_stages == 1 and transport != "link":
                        results[transport]["1"] = results["link"]["1"]  # no hop: the same run
                        continue
                    os.environ.update(environment)
                    chain = (tcp_addresses if transport == "tcp" else addresses)[: n_stages - 1]
                    results[transport][str(n_stages)] = event_loop.run(
                        measure(path, chain, args.tokens, dtype)
                    )
        finally:
            workers.stop()

    print(f"checkpoint: {described}, 1 thread a stage")
    print(
        f"{'transport':>9}  {'stages':>6}  {'ms/token':>9}  {'tokens/s':>9}  {'8 seqs tokens/s':>16}  "
        f"{'transport/hop ms':>17}  {'by difference ms':>17}"
    )
    report: dict[str, object] = {"shape": args.shape, "transports": results}
    for transport, rows in results.items():
        base = rows["1"]["ms_per_token"]
        difference = {n: (rows[n]["ms_per_token"] - base) / (int(n) - 1) for n in ("2", "4")}
        report[f"{transport}_overhead_per_hop_ms"] = {n: rows[n]["transport_per_hop_ms"] for n in ("2", "4")}
        report[f"{transport}_by_difference_ms"] = difference
        for n, figures in rows.items():
            hop = f"{figures['transport_per_hop_ms']:.3f}" if "transport_per_hop_ms" in figures else "-"
            by_difference = f"{difference[n]:.2f}" if n in difference else "-"
            print(
                f"{transport:>9}  {n:>6}  {figures['ms_per_token']:>9.2f}  {figures['tokens_per_s']:>9.1f}  "
                f"{figures['batch8_tokens_per_s']:>16.1f}  {hop:>17}  {by_difference:>17}"
            )
    # The figure the targets name: a hop over the default transport.
    report["overhead_per_hop_ms"] = report["link_overhead_per_hop_ms"]
    report["stages"] = results["link"]
    if args.json:
        print(json.dumps(report))
    if args.plot:
        from plots import plot_hop_overhead

        print(f"plot: {plot_hop_overhead(report, args.plot)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
