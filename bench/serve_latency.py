"""Through the HTTP API: time to first token and decode speed, one request at a time and many at once.

Starts `meshllm serve` on a random-weight checkpoint (2 stages by default: this machine's coordinator
stage plus one worker process; `--stages 1,2,4` runs each in turn), sends streamed chat requests with
`ignore_eos` so each yields exactly --tokens tokens, and prints TTFT (p50, p90) and tokens/s per stream
and in total, for each concurrency level.

    .venv/bin/python bench/serve_latency.py [--stages 1,2,4] [--tokens 64] [--concurrency 1,4,8] [--json]
        [--plot FILE.png]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from bench_common import SPEC, free_port, health_problem, machine_load

from meshllm.models.tiny import make_checkpoint


async def one_request(client: httpx.AsyncClient, tokens: int) -> tuple[float, float]:
    """(seconds to the first content chunk, decode tokens/s after it) of one streamed request."""
    body = {
        "model": "bench",
        "messages": [{"role": "user", "content": "Tell me about the mountains and the sea."}],
        "max_tokens": tokens,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    first = None
    completion_tokens = 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter()
            if chunk.get("usage"):
                completion_tokens = chunk["usage"]["completion_tokens"]
    ended = time.perf_counter()
    first = first or ended
    rate = (completion_tokens - 1) / (ended - first) if ended > first else 0.0
    return first - started, rate


async def measure(url: str, tokens: int, concurrency: int) -> dict[str, float]:
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        await one_request(client, 4)  # warm up
        started = time.perf_counter()
        results = await asyncio.gather(*(one_request(client, tokens) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    ttfts = sorted(ttft for ttft, _ in results)
    return {
        "ttft_p50_ms": statistics.median(ttfts) * 1000,
        "ttft_p90_ms": ttfts[min(len(ttfts) - 1, int(0.9 * len(ttfts)))] * 1000,
        "tokens_per_s_per_stream": statistics.median(rate for _, rate in results),
        "tokens_per_s_total": concurrency * tokens / elapsed,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--stages", default="2", help="comma-separated stage counts, each served in turn")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--concurrency", default="1,4,8", help="comma-separated numbers of parallel requests")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    parser.add_argument(
        "--plot", type=Path, metavar="FILE.png", help="also draw the figures to FILE.png (needs matplotlib)"
    )
    args = parser.parse_args()
    levels = [int(level) for level in args.concurrency.split(",")]
    stage_counts = [int(n) for n in args.stages.split(",")]

    results: dict[str, dict[str, dict[str, float]]] = {}
    load_before = machine_load()
    with tempfile.TemporaryDirectory() as folder:
        path = make_checkpoint(Path(folder) / "bench", arch="qwen3", spec=SPEC)
        for stages in stage_counts:
            results[str(stages)] = serve_and_measure(path, stages, args.tokens, levels)

    print(f"checkpoint: qwen3-shaped, {SPEC.num_hidden_layers} layers, hidden {SPEC.hidden_size}")
    print(f"machine: {load_before} at the start, {machine_load()} at the end")
    print(
        f"{'stages':>6}  {'streams':>7}  {'TTFT p50 ms':>11}  {'TTFT p90 ms':>11}  {'tok/s a stream':>14}  "
        f"{'tok/s total':>11}"
    )
    for stages, by_level in results.items():
        for level, figures in by_level.items():
            print(
                f"{stages:>6}  {level:>7}  {figures['ttft_p50_ms']:>11.1f}  {figures['ttft_p90_ms']:>11.1f}  "
                f"{figures['tokens_per_s_per_stream']:>14.1f}  {figures['tokens_per_s_total']:>11.1f}"
            )
    report = {"tokens": args.tokens, "machine": [load_before, machine_load()], "stages": results}
    if args.json:
        print(json.dumps(report))
    if args.plot:
        from plots import plot_serve_latency

        print(f"plot: {plot_serve_latency(report, args.plot)}")
    return 0


def serve_and_measure(path: Path, stages: int, tokens: int, levels: list[int]) -> dict[str, dict[str, float]]:
    """`meshllm serve --stages N` on the checkpoint, every concurrency level measured, then stopped by pid."""
    port = free_port()
    command = [sys.executable, "-m", "meshllm", "serve", "--model", str(path), "--port", str(port)]
    command += ["--stages", str(stages), "--served-model-name", "bench"]
    serve = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        problem = health_problem(serve, url, 120)
        if problem:
            raise SystemExit(f"meshllm serve: {problem}")
        return {str(level): asyncio.run(measure(url, tokens, level)) for level in levels}
    finally:
        serve.send_signal(signal.SIGINT)
        serve.wait(timeout=30)


if __name__ == "__main__":
    sys.exit(main())
