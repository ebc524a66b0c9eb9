"""What a pipeline hop costs: the same checkpoint as 1 in-process stage, then 2 and 4 stages over loopback gRPC.

Decode of one sequence is latency-bound, so every extra hop adds its transport time to every token:
overhead per hop = (ms per token with N stages - ms per token with 1 stage) / (N - 1).
Also reports decode throughput with 8 concurrent sequences, where steps of different sequences overlap.

    .venv/bin/python bench/hop_overhead.py [--tokens 64] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

from bench_common import SPEC, free_port

from meshllm.models.tiny import make_checkpoint  # noqa: E402
from meshllm.runtime.coordinator import Coordinator, WorkerAddress  # noqa: E402
from meshllm.step import SamplingParams  # noqa: E402


def start_worker(name: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "meshllm", "worker", "--host", "127.0.0.1", "--port", str(port)]
    process = subprocess.Popen(
        command + ["--name", name, "--threads", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return process, f"127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"worker {name} did not start")


async def measure(path: Path, workers: list[WorkerAddress], tokens: int) -> dict[str, float]:
    coordinator = await Coordinator.start(str(path), workers, local_stage=True)
    prompt = list(range(3, 35))
    try:

        async def decode(n: int) -> None:
            handle = coordinator.submit(prompt, SamplingParams(), n, ignore_eos=True)
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
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    processes: list[subprocess.Popen] = []
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as folder:
        path = make_checkpoint(Path(folder) / "bench", arch="qwen3", spec=SPEC)
        try:
            addresses = []
            for index in range(3):
                process, address = start_worker(f"w{index + 1}")
                processes.append(process)
                addresses.append(WorkerAddress(f"w{index + 1}", address))
            for n_stages in (1, 2, 4):
                results[str(n_stages)] = asyncio.run(measure(path, addresses[: n_stages - 1], args.tokens))
        finally:
            for process in processes:
                process.kill()
                process.wait()

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
    if args.json:
        print(json.dumps({"stages": results, "overhead_per_hop_ms": overhead}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
