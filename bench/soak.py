"""A long run through the HTTP API: does anything grow or leak?

Starts `meshllm serve --stages 2` on a random-weight checkpoint, keeps 8 streamed chat requests going for
--minutes (default 10; greedy and seeded, 16 to 64 tokens each), and prints each process's resident memory
after a warm-up and at the end, the requests served, the errors, and the live sequences left on every stage
(from /distributed/gpu-info) and in the coordinator (/metrics) once the streams have stopped.

    .venv/bin/python bench/soak.py [--minutes 10] [--streams 8] [--json]

Not part of `make test`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from bench_common import free_port, health_problem

from meshllm.models.tiny import make_checkpoint


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


async def one_stream(client: httpx.AsyncClient, rng: random.Random) -> None:
    body: dict = {
        "messages": [{"role": "user", "content": f"Tell me about the number {rng.randrange(1000)}."}],
        "max_tokens": rng.randrange(16, 65),
        "ignore_eos": True,
        "stream": True,
    }
    if rng.random() < 0.5:
        body.update(temperature=1.0, top_p=0.9, seed=rng.randrange(1 << 30))
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"status {response.status_code}: {(await response.aread()).decode()[:200]}")
        async for line in response.aiter_lines():
            if line.startswith("data: {") and '"error"' in line:
                raise RuntimeError(line[:300])


async def soak(url: str, streams: int, seconds: float) -> tuple[int, list[str]]:
    served, errors = 0, []
    deadline = time.monotonic() + seconds

    async def loop(index: int) -> None:
        nonlocal served
        rng = random.Random(index)
        async with httpx.AsyncClient(base_url=url, timeout=300) as client:
            while time.monotonic() < deadline:
                try:
                    await one_stream(client, rng)
                    served += 1
                except Exception as error:  # counted and shown: the soak goes on
                    errors.append(f"{type(error).__name__}: {error}")

    await asyncio.gather(*(loop(i) for i in range(streams)))
    return served, errors


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        path = make_checkpoint(Path(folder) / "soak", arch="qwen3")
        port = free_port()
        log = open(Path(folder) / "serve.log", "w+")
        command = [sys.executable, "-m", "meshllm", "serve", "--model", str(path), "--port", str(port)]
        serve = subprocess.Popen([*command, "--stages", "2"], stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            problem = health_problem(serve, url, 120)
            if problem:
                raise SystemExit(f"meshllm serve: {problem}:\n" + Path(log.name).read_text())
            pids = {"coordinator": serve.pid}
            for name, pid in re.findall(
                r"started (worker\d+) on \S+ \(pid (\d+)", Path(log.name).read_text()
            ):
                pids[name] = int(pid)
            asyncio.run(soak(url, args.streams, 20.0))  # warm-up: caches, allocator pools, imports
            start_rss = {name: rss_bytes(pid) for name, pid in pids.items()}
            started = time.monotonic()
            served, errors = asyncio.run(soak(url, args.streams, args.minutes * 60))
            elapsed = time.monotonic() - started
            end_rss = {name: rss_bytes(pid) for name, pid in pids.items()}
            info = httpx.get(f"{url}/distributed/gpu-info", timeout=30).json()
            metrics = httpx.get(f"{url}/metrics", timeout=30).text
        finally:
            serve.send_signal(signal.SIGINT)
            serve.wait(timeout=30)
            log.close()

    left = {device["name"]: device["live_sequences"] for device in info["devices"]}
    gauge = re.search(r"^meshllm_live_sequences\S* (\S+)$", metrics, re.MULTILINE)
    print(f"soak: {args.streams} streams for {elapsed / 60:.1f} min against 2 stages (tiny qwen3 checkpoint)")
    print(f"requests served: {served} ({served / elapsed:.1f}/s); errors: {len(errors)}")
    for error in errors[:5]:
        print(f"  error: {error}")
    for name in pids:
        change = (end_rss[name] - start_rss[name]) / start_rss[name] * 100
        print(f"RSS {name}: {start_rss[name] / 1e6:.1f} MB -> {end_rss[name] / 1e6:.1f} MB ({change:+.1f}%)")
    print(
        "live sequences left: "
        + ", ".join(f"{name} {count}" for name, count in left.items())
        + f"; coordinator gauge {gauge.group(1) if gauge else '?'}"
    )
    if args.json:
        print(json.dumps({
            "minutes": elapsed / 60, "served": served, "errors": len(errors),
            "rss_start": start_rss, "rss_end": end_rss, "live_left": left,
        }))  # fmt: skip
    return 0 if not errors and not any(left.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
