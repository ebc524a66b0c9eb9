"""What a pipeline hop costs: the same checkpoint as 1 in-process stage, then 2 and 4 stages over loopback gRPC.

Decode of one sequence is latency-bound, so every extra hop adds its transport time to every token:
overhead per hop = (ms per token with N stages - ms per token with 1 stage) / (N - 1).
Also reports decode throughput with 8 concurrent sequences, where steps of different sequences overlap.

    .venv/bin/python bench/hop_overhead.py [--tokens 64] [--json] [--plot FILE.png]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

from bench_common import SPEC

from meshllm.models.tiny import make_checkpoint  # noqa: E402
from meshllm.runtime.coordinator import Coordinator  # noqa: E402
from meshllm.runtime.coordinator_config import CoordinatorConfig, WorkerAddress  # noqa: E402
from meshllm.runtime.engine_client import GenerateRequest  # noqa: E402
from meshllm.runtime.local_workers import LocalWorkers  # noqa: E402
from meshllm.step import SamplingParams  # noqa: E402


async def measure(path: Path, workers: list[WorkerAddress], tokens: int) -> dict[str, float]:
    coordinator = await Coordinator.start(CoordinatorConfig(model=str(path), workers=tuple(workers)))
    prompt = list(range(3, 35))
    try:

        async def decode(n: int) -> None:
            handle = coordinator.generate(GenerateRequest(prompt, SamplingParams(), n, ignore_eos=True))
            async for _ in handle:
                pass

        await decode(8)  # warm up every stage
        started = time.perf_counter()
        await decode(tokens)
        single = time.perf_counter() - started
        started = time.perf_counter()
        await asyncio.gather(*(decode(tokens) for _ in range(8)))
        batched = time.perf_counter() - started
    finally:
        await coordinator.close()
    return {
        "ms_per_token": single / tokens * 1000,
        "tokens_per_s": tokens / single,
        "batch8_tokens_per_s": 8 * tokens / batched,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=64, help="decode tokens per sequence")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    parser.add_argument(
        "--plot", type=Path, metavar="FILE.png", help="also draw the figures to FILE.png (needs matplotlib)"
    )
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    results: dict[str, dict[str, float]] = {}
    workers = LocalWorkers()
    with tempfile.TemporaryDirectory() as folder:
        path = make_checkpoint(Path(folder) / "bench", arch="qwen3", spec=SPEC)
        try:
            addresses = workers.spawn(3, token=None, threads=1, output=subprocess.DEVNULL)
            asyncio.run(workers.wait_healthy(token=None))
            for n_stages in (1, 2, 4):
                results[str(n_stages)] = asyncio.run(measure(path, addresses[: n_stages - 1], args.tokens))
        finally:
            workers.stop()

    base = results["1"]["ms_per_token"]
    overhead = {n: (results[n]["ms_per_token"] - base) / (int(n) - 1) for n in ("2", "4")}
    print(
        f"checkpoint: qwen3-shaped, {SPEC.num_hidden_layers} layers, hidden {SPEC.hidden_size}, float32, 1 thread a stage"
    )
    print(
        f"{'stages':>6}  {'ms/token':>9}  {'tokens/s':>9}  {'8 seqs tokens/s':>16}  {'overhead/hop ms':>16}"
    )
    for n, figures in results.items():
        hop = f"{overhead[n]:.2f}" if n in overhead else "-"
        print(
            f"{n:>6}  {figures['ms_per_token']:>9.2f}  {figures['tokens_per_s']:>9.1f}  "
            f"{figures['batch8_tokens_per_s']:>16.1f}  {hop:>16}"
        )
    report = {"stages": results, "overhead_per_hop_ms": overhead}
    if args.json:
        print(json.dumps(report))
    if args.plot:
        from plots import plot_hop_overhead

        print(f"plot: {plot_hop_overhead(report, args.plot)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
