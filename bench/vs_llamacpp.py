"""meshllm against llama.cpp through the HTTP API: the same client, the same checkpoint, the same requests.

Each server is started on 127.0.0.1 (free ports), sent streamed chat completions (a prompt of about
--prompt-tokens tokens, exactly --tokens new tokens with `ignore_eos`, greedy) 1, 4 and 16 at a time,
then stopped by pid. Per concurrency level it records each stream's decode tokens/s after its first
token, the total tokens/s (all streams' tokens over the wall time, prefill included) and the time to the
first token; each level is repeated --repeats times and the table gives medians with min–max. With
--interleave every server is started first and each repeat goes round all of them, so that a machine
whose speed drifts over minutes moves every row alike (for ratios of a few percent).

Servers, on the random-weight qwen3-0.6b-shaped checkpoint (bfloat16, under ~/.cache/meshllm-bench/):
  meshllm serve --stages 1 and --stages 2 (its default thread split: 2 threads, or 1 + 1), and
  with --quantize Q the same with `--quantize Q` (skipped with a note when serve has no such option);
  with --engine E on that engine (ggml: llama.cpp's kernels), and with --gguf (ggml) serving the very
  GGUF files llama.cpp serves, the quantized rows the quantized file as stored;
  with --llamacpp DIR: llama-server single-process with 2 threads, and llama-server --rpc over two
  rpc-servers of 1 thread each (every layer on them: -ngl 99), on GGUFs in bf16 and q8_0.

With --one-core-machines the two cores stand for two machines of one core each (they still share the
memory bus, which two machines would not): every process is held to its machine's core and computes
with one thread. One stage and llama-server single-process run on core 0; meshllm's two stages are
`serve --cores 0` with a `meshllm worker --cores 1` (as on two machines: `serve --workers`), llama.cpp's
split an rpc-server on each core under llama-server on core 0.

    .venv/bin/python bench/vs_llamacpp.py [--llamacpp DIR] [--quantize int8] [--engine ggml [--gguf]]
        [--one-core-machines] [--interleave] [--serve-args ARGS] [--only LABELS] [--json] [--plot FILE.png]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import re
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from bench_common import (
    SHAPES,
    free_port,
    gguf_file,
    health_problem,
    llamacpp_binary,
    llamacpp_commit,
    machine_load,
    shape_checkpoint,
    show,
    spread,
)

START_TIMEOUT = 300.0  # seconds for a server to load the model and answer /health
REQUEST_TIMEOUT = 120.0  # seconds without a byte from a streaming reply: the request is an error
GGUF_OF_QUANTIZE = {"int8": "q8_0", "int4": "q4_0"}
_TEXT = (
    "A pipeline splits a model's layers across machines so that each one holds only its share of the "
    "weights. The coordinator embeds the prompt, runs the first layers and sends the hidden states to the "
    "next stage. Tell me about the weather, the mountains, the sea and the river, and the quick brown fox "
    "that jumps over the lazy dog while the cat sleeps in the warm afternoon sun. "
)


@dataclass
class ServerSpec:
    label: str
    kind: str  # "meshllm" | "llama.cpp"
    weights: str  # "bf16", "int8", "q8_0", …
    layout: str  # "1 stage", "2 stages", "1 process", "rpc 2x1"
    command: list[str] = field(default_factory=list)
    rpc_servers: int = 0  # rpc-server processes to start first (their ports go into --rpc)
    core: int | None = None  # the one core the command runs on (None: any)
    rpc_cores: tuple[int, ...] = ()  # the core of each rpc-server (empty: any)
    worker: list[str] = field(default_factory=list)  # a `meshllm worker` to start first, for --workers


class Server:
    """Processes started for one row, stopped by pid in reverse order."""

    def __init__(self, log_dir: Path):
        self.processes: list[subprocess.Popen] = []
        self.logs: list[Path] = []
        self.log_dir = log_dir

    def start(self, name: str, command: list[str], core: int | None = None) -> subprocess.Popen:
        log = self.log_dir / f"{name}-{len(self.logs)}.log"
        pin = None if core is None else lambda: os.sched_setaffinity(0, {core})
        with log.open("wb") as output:
            process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=output, stderr=output, preexec_fn=pin
            )
        self.processes.append(process)
        self.logs.append(log)
        return process

    def failure(self, message: str) -> SystemExit:
        tails = [
            f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-15:])
            for log in self.logs
        ]
        return SystemExit(message + "\n" + "\n".join(tails))

    def stop(self) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGINT)
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=30)


def wait_port(server: Server, process: subprocess.Popen, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise server.failure(f"{process.args[0]} exited during start (exit code {process.returncode})")
        with socket.socket() as probe:
            probe.settimeout(1)
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        if time.monotonic() > deadline:
            raise server.failure(f"{process.args[0]} did not listen on port {port} in {timeout:.0f} s")
        time.sleep(0.3)


def wait_healthy(server: Server, process: subprocess.Popen, url: str, timeout: float) -> None:
    problem = health_problem(process, url, timeout, interval=0.5)
    if problem:
        raise server.failure(problem)


@contextlib.contextmanager
def running(spec: ServerSpec, log_dir: Path, llamacpp: Path | None) -> Iterator[tuple[str, Server]]:
    """Start the processes of `spec` on free loopback ports; yields the API's base URL and the processes."""
    server = Server(log_dir)
    name = spec.label.replace(" ", "-").replace("/", "-")
    try:
        command = list(spec.command)
        if spec.rpc_servers:
            assert llamacpp is not None
            rpc = rpc_server_binary(llamacpp)
            addresses = []
            for index in range(spec.rpc_servers):
                port = free_port()
                core = spec.rpc_cores[index] if spec.rpc_cores else None
                process = server.start(
                    f"{name}-rpc", [str(rpc), "-H", "127.0.0.1", "-p", str(port), "-t", "1"], core
                )
                wait_port(server, process, port, 60)
                addresses.append(f"127.0.0.1:{port}")
            command += ["--rpc", ",".join(addresses)]
        if spec.worker:
            port = free_port()
            process = server.start(f"{name}-worker", spec.worker + ["--port", str(port)])
            wait_port(server, process, port, START_TIMEOUT)
            command += ["--workers", f"w1=127.0.0.1:{port}"]
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        process = server.start(name, command + ["--port", str(port)], spec.core)
        wait_healthy(server, process, url, START_TIMEOUT)
        yield url, server
    finally:
        server.stop()


PREDICTED = re.compile(
    r"predicted decode: ([\d.]+) tok/s for one stream, [\d.]+ tok/s total for (\d+) streams "
    r"\(([\d.]+) counting"
)
SCHEDULE = re.compile(r"stages on the same cores: ([^\n]*)")


def prediction_in(logs: list[Path]) -> dict[str, float]:
    """The decode speed `meshllm serve` predicted at its start, by streams: one stream's decode tok/s, and
    the many streams' total counting their prompts (what this client measures); {} when none was logged."""
    for log in logs:
        found = PREDICTED.search(log.read_text(errors="replace"))
        if found:
            return {"1": float(found[1]), found[2]: float(found[3])}
    return {}


def schedule_in(logs: list[Path]) -> str:
    """How `meshllm serve` chose to run stages on the same cores ("" when they have cores of their own)."""
    for log in logs:
        found = SCHEDULE.search(log.read_text(errors="replace"))
        if found:
            return found[1]
    return ""


def rpc_server_binary(llamacpp: Path) -> Path:
    for name in ("rpc-server", "ggml-rpc-server"):
        if (llamacpp / "build" / "bin" / name).exists():
            return llamacpp / "build" / "bin" / name
    return llamacpp_binary(llamacpp, "rpc-server")


@dataclass
class Reply:
    ttft: float  # seconds to the first content chunk
    decode_rate: float  # tokens/s after the first token
    completion_tokens: int
    prompt_tokens: int


_request_ids = itertools.count()


def prompt_text(words: int) -> str:
    """A user message of `words` words, with a number in front so no server reuses a cached prefix."""
    text = " ".join(itertools.islice(itertools.cycle(_TEXT.split()), words))
    return f"Request {next(_request_ids)}: {text}"


async def one_request(client: httpx.AsyncClient, words: int, tokens: int) -> Reply:
    body = {
        "model": "bench",
        "messages": [{"role": "user", "content": prompt_text(words)}],
        "max_tokens": tokens,
        "ignore_eos": True,
        "temperature": 0.0,
        # The template adds an empty <think></think> block only when enable_thinking is false, which is
        # llama-server's default and not meshllm's: ask for the same rendering from both.
        "chat_template_kwargs": {"enable_thinking": True},
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    first = None
    chunks, usage = 0, None
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise SystemExit(f"HTTP {response.status_code}: {(await response.aread()).decode()[:500]}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0].get("delta", {}).get("content"):
                chunks += 1
                first = first or time.perf_counter()
            if chunk.get("usage"):
                usage = chunk["usage"]
    ended = time.perf_counter()
    completion = usage["completion_tokens"] if usage else chunks
    first = first or ended
    rate = (completion - 1) / (ended - first) if ended > first else 0.0
    return Reply(first - started, rate, completion, usage["prompt_tokens"] if usage else 0)


async def measure_level(url: str, words: int, tokens: int, streams: int) -> dict[str, float]:
    timeout = httpx.Timeout(REQUEST_TIMEOUT, connect=10)
    limits = httpx.Limits(max_connections=streams + 1)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:
        started = time.perf_counter()
        replies = await asyncio.gather(*(one_request(client, words, tokens) for _ in range(streams)))
        elapsed = time.perf_counter() - started
    short = [reply.completion_tokens for reply in replies if reply.completion_tokens != tokens]
    if short:
        print(
            f"warning: {len(short)} of {streams} replies had {short[0]} tokens, not {tokens}", file=sys.stderr
        )
    return {
        "decode_tokens_per_s_a_stream": statistics.median(reply.decode_rate for reply in replies),
        "tokens_per_s_total": sum(reply.completion_tokens for reply in replies) / elapsed,
        "ttft_ms": statistics.median(reply.ttft for reply in replies) * 1000,
        "prompt_tokens": statistics.median(reply.prompt_tokens for reply in replies),
    }


async def measure(url: str, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Every level, --repeats times; each figure as a spread over the repeats."""
    return (await measure_interleaved({"": url}, args))[""]


async def measure_interleaved(urls: dict[str, str], args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Every level, --repeats times, each repeat going round every server in turn (so that a machine whose
    speed drifts over minutes moves every row alike); each figure as a spread over the repeats."""
    timeout = httpx.Timeout(REQUEST_TIMEOUT, connect=10)
    for url in urls.values():
        async with httpx.AsyncClient(base_url=url, timeout=timeout) as client:
            await one_request(client, args.words, 4)  # warm up
    figures: dict[str, dict[str, Any]] = {label: {} for label in urls}
    for streams in args.levels:
        runs: dict[str, list[dict[str, float]]] = {label: [] for label in urls}
        for _ in range(args.repeats):
            for label, url in urls.items():
                runs[label].append(await measure_level(url, args.words, args.tokens, streams))
        for label, done in runs.items():
            level = figures[label][str(streams)] = {
                key: spread([run[key] for run in done]) for key in done[0]
            }
            level["headline_repeats"] = [run[HEADLINE[streams == 1]] for run in done]  # in order, for pairs
    return figures


# The figure a level is judged by: decode tokens/s of the one stream, total tokens/s of many.
HEADLINE = {True: "decode_tokens_per_s_a_stream", False: "tokens_per_s_total"}


def headline(figures: dict[str, dict[str, Any]], streams: str) -> dict[str, float]:
    """The figure a level is judged by (`HEADLINE`), as a spread over the repeats."""
    return figures[streams][HEADLINE[streams == "1"]]  # type: ignore[no-any-return]


def split_ratio(numerator: dict[str, Any], denominator: dict[str, Any], paired: bool) -> dict[str, float]:
    """One level's ratio of two rows as a spread: repeat by repeat where the repeats were interleaved
    (each pair measured within minutes, so the machine's drift cancels), else the ratio of the medians."""
    if not paired:
        medians = [statistics.median(rows["headline_repeats"]) for rows in (numerator, denominator)]
        return spread([medians[0] / medians[1]])
    pairs = zip(numerator["headline_repeats"], denominator["headline_repeats"], strict=True)
    return spread([a / b for a, b in pairs])


def serve_has_option(option: str) -> bool:
    command = [sys.executable, "-m", "meshllm", "serve", "--help"]
    return option in subprocess.run(command, capture_output=True, text=True, timeout=120).stdout


def server_specs(args: argparse.Namespace, checkpoint: Path) -> tuple[list[ServerSpec], list[str]]:
    notes: list[str] = []
    engine = [] if args.engine is None else ["--engine", args.engine]
    prefix = "meshllm" if args.engine is None else f"meshllm {args.engine}"

    def meshllm(n: int, weights: str, model: Path, extra: list[str]) -> ServerSpec:
        command = [sys.executable, "-m", "meshllm", "serve", "--model", str(model), "--dtype", "bfloat16"]
        command += ["--served-model-name", "bench", *engine, *extra]
        worker: list[str] = []
        if not args.one_core_machines or n == 1:
            command += ["--stages", str(n)]
        if args.one_core_machines:  # this process on core 0, the second stage a worker of its own on core 1
            command += ["--cores", "0", "--threads", "1"]
            if n == 2:
                worker = [sys.executable, "-m", "meshllm", "worker", "--host", "127.0.0.1", "--name", "w1"]
                worker += ["--cores", "1", "--threads", "1", *engine]
        command += shlex.split(args.serve_args)
        label = f"{prefix} {n} stage{'s' if n > 1 else ''} {weights}"
        label += f" ({args.serve_args})" if args.serve_args else ""
        return ServerSpec(label, "meshllm", weights, f"{n} stage", command, worker=worker)

    def model_of(kind: str) -> Path:
        """What meshllm serves: the checkpoint, or with --gguf the very GGUF llama.cpp serves."""
        return gguf_file(checkpoint, args.llamacpp, kind) if args.gguf else checkpoint

    specs = [meshllm(n, "bf16", model_of("bf16"), []) for n in (1, 2)]
    kinds = ["bf16", "q8_0"]
    if args.quantize:
        if args.gguf:  # the quantized GGUF as stored
            quantized = model_of(GGUF_OF_QUANTIZE[args.quantize])
            specs += [meshllm(n, args.quantize, quantized, []) for n in (1, 2)]
        elif serve_has_option("--quantize"):
            specs += [meshllm(n, args.quantize, checkpoint, ["--quantize", args.quantize]) for n in (1, 2)]
        else:
            notes.append(f"meshllm serve has no --quantize option yet: the {args.quantize} rows are skipped")
        if GGUF_OF_QUANTIZE[args.quantize] not in kinds:
            kinds.append(GGUF_OF_QUANTIZE[args.quantize])
    if args.llamacpp is not None:
        server = str(llamacpp_binary(args.llamacpp, "llama-server"))
        context = 16 * (args.words * 2 + args.tokens + 64)  # every slot holds one request
        for kind in kinds:
            model = gguf_file(checkpoint, args.llamacpp, kind)
            common = [server, "-m", str(model), "--host", "127.0.0.1", "-c", str(context), "-np", "16"]
            common += ["--alias", "bench", "--no-webui"]
            pinned = args.one_core_machines
            specs.append(
                ServerSpec(
                    f"llama.cpp {kind}",
                    "llama.cpp",
                    kind,
                    "1 process",
                    common + ["-t", "1" if pinned else "2"],
                    core=0 if pinned else None,
                )
            )
            specs.append(
                ServerSpec(
                    f"llama.cpp rpc {kind}",
                    "llama.cpp",
                    kind,
                    "rpc 2x1",
                    common + ["-t", "1", "-ngl", "99"],
                    rpc_servers=2,
                    core=0 if pinned else None,
                    rpc_cores=(0, 1) if pinned else (),
                )
            )
    return specs, notes


def counterpart(spec: ServerSpec, specs: list[ServerSpec]) -> ServerSpec | None:
    """The llama.cpp row a meshllm row is compared with: one process ↔ 1 stage, rpc ↔ 2 stages."""
    weights = {"bf16": "bf16", **GGUF_OF_QUANTIZE}.get(spec.weights)
    layout = "1 process" if spec.layout == "1 stage" else "rpc 2x1"
    for other in specs:
        if other.kind == "llama.cpp" and other.weights == weights and other.layout == layout:
            return other
    return None


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", default="0.6b", choices=sorted(SHAPES))
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per request")
    parser.add_argument("--words", type=int, default=100, help="words of the user message (~128 tokens)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--concurrency", default="1,4,16", help="comma-separated numbers of parallel streams")
    parser.add_argument("--quantize", choices=sorted(GGUF_OF_QUANTIZE), default=None)
    parser.add_argument("--llamacpp", type=Path, default=None, help="a llama.cpp checkout built in DIR/build")
    parser.add_argument(
        "--engine", default=None, help="meshllm's engine (torch, ggml, mlx; default: serve's)"
    )
    parser.add_argument(
        "--gguf",
        action="store_true",
        help="meshllm serves the same GGUF files as llama.cpp, on the ggml engine (needs --llamacpp)",
    )
    parser.add_argument(
        "--interleave",
        action="store_true",
        help="start every server first, then measure them in turn at each repeat (they must fit in memory "
        "together; the idle ones still answer their own health checks)",
    )
    parser.add_argument(
        "--one-core-machines",
        action="store_true",
        help="the two cores as two machines of one core each: every process held to its core, one thread",
    )
    parser.add_argument(
        "--serve-args", default="", help="more arguments for every meshllm serve (e.g. '--threads 2')"
    )
    parser.add_argument("--only", default=None, help="comma-separated row labels to run (default: all)")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    parser.add_argument(
        "--plot", type=Path, metavar="FILE.png", help="also draw the figures to FILE.png (needs matplotlib)"
    )
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the servers on the way out, by pid
    args.levels = [int(level) for level in args.concurrency.split(",")]
    if args.one_core_machines and len(os.sched_getaffinity(0)) < 2:
        parser.error("--one-core-machines needs two cores")
    if args.gguf and (args.engine not in (None, "ggml") or args.llamacpp is None):
        parser.error("--gguf needs the ggml engine and --llamacpp (only the ggml engine reads GGUF files)")
    if args.gguf:
        args.engine = "ggml"  # what serve runs a GGUF file on anyway; named, so the rows say so

    checkpoint = shape_checkpoint(args.shape)
    specs, notes = server_specs(args, checkpoint)
    if args.only:
        wanted = set(args.only.split(","))
        specs = [spec for spec in specs if spec.label in wanted]
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    results: dict[str, dict[str, dict[str, Any]]] = {}
    predictions: dict[str, dict[str, float]] = {}  # meshllm's own, from serve's log
    schedules: dict[str, str] = {}  # how it runs stages on the same cores, from serve's log
    load_before = machine_load()

    def read_logs(label: str, server: Server) -> None:
        predicted = prediction_in(server.logs)
        if predicted:
            predictions[label] = predicted
        schedule = schedule_in(server.logs)
        if schedule:
            schedules[label] = schedule

    with tempfile.TemporaryDirectory(prefix="meshllm-bench-") as log_dir:
        if args.interleave:  # every server up at once, measured in turn
            with contextlib.ExitStack() as stack:
                urls: dict[str, str] = {}
                for spec in specs:
                    print(f"starting {spec.label}", file=sys.stderr)
                    url, server = stack.enter_context(running(spec, Path(log_dir), args.llamacpp))
                    urls[spec.label] = url
                    read_logs(spec.label, server)
                results.update(asyncio.run(measure_interleaved(urls, args)))
        for spec in specs if not args.interleave else []:
            print(f"running {spec.label}", file=sys.stderr)
            with running(spec, Path(log_dir), args.llamacpp) as (url, server):
                results[spec.label] = asyncio.run(measure(url, args))
                read_logs(spec.label, server)

    commit = llamacpp_commit(args.llamacpp) if args.llamacpp is not None else None
    prompt_tokens = {
        label: figures[key]["prompt_tokens"]["median"]
        for label, figures in results.items()
        for key in figures
    }
    print(
        f"checkpoint: qwen3-{args.shape} shape, random weights, bfloat16; streamed chat, {args.tokens} new "
        f"tokens a request, prompt tokens {sorted(set(prompt_tokens.values()))}; {args.repeats} repeats, "
        "median (min–max)"
    )
    print(f"machine: {load_before} at the start, {machine_load()} at the end")
    if args.interleave:
        print("interleaved: every server up at once, each repeat going round all of them")
    if args.one_core_machines:
        print("two machines of one core each: every process held to its core, one compute thread")
    if commit is not None:
        print(f"llama.cpp: {commit}")
    titles = [f"{level} stream{'s' if level > 1 else ''} tok/s" for level in args.levels]
    titles = [
        title.replace("1 stream", "1 stream decode") if title.startswith("1 ") else title for title in titles
    ]
    first = args.levels[0]
    print(f"{'server':<24} " + " ".join(f"{title:>22}" for title in titles) + f" {f'TTFT {first} ms':>22}")
    for label, figures in results.items():
        cells = [show(headline(figures, str(level))) for level in args.levels]
        cells.append(show(figures[str(first)]["ttft_ms"], digits=0))
        print(f"{label:<24} " + " ".join(f"{cell:>22}" for cell in cells))

    ratios: dict[str, dict[str, float]] = {}
    for spec in specs:
        other = counterpart(spec, specs) if spec.kind == "meshllm" else None
        if other is None or spec.label not in results or other.label not in results:
            continue
        ratios[f"{spec.label} / {other.label}"] = {
            str(level): headline(results[spec.label], str(level))["median"]
            / headline(results[other.label], str(level))["median"]
            for level in args.levels
        }
    # What a second stage costs or gains, same weights: meshllm's 2 stages against its 1 stage.
    splits: dict[str, dict[str, dict[str, float]]] = {}
    for spec in specs:
        if spec.kind != "meshllm" or spec.layout != "2 stage" or spec.label not in results:
            continue
        ones = [
            o for o in specs if o.kind == "meshllm" and o.weights == spec.weights and o.layout == "1 stage"
        ]
        if ones and ones[0].label in results:
            two_rows, one_rows = results[spec.label], results[ones[0].label]
            splits[f"{spec.label} / {ones[0].label}"] = {
                str(level): split_ratio(two_rows[str(level)], one_rows[str(level)], args.interleave)
                for level in args.levels
            }
    if predictions:
        print("meshllm's own prediction (serve's log) against the measured median:")
        for label, predicted in predictions.items():
            cells = []
            for level in (str(level) for level in args.levels if str(level) in predicted):
                measured = headline(results[label], level)["median"]
                cells.append(
                    f"{level} stream{'s' if level != '1' else ''}: {predicted[level]:.1f} predicted, "
                    f"{measured:.1f} measured ({measured / predicted[level]:.2f}×)"
                )
            print(f"  {label:<22} " + "; ".join(cells))
    for label, schedule in schedules.items():
        print(f"  {label:<22} stages on the same cores: {schedule}")
    if ratios:
        print(f"{'ratio of medians':<42} " + " ".join(f"{f'{level} stream(s)':>12}" for level in args.levels))
        for pair, values in ratios.items():
            print(f"{pair:<42} " + " ".join(f"{values[str(level)]:>12.2f}" for level in args.levels))
    if splits:
        way = "median of the repeats' ratios, interleaved" if args.interleave else "ratio of medians"
        print(
            f"{f'2 stages / 1 stage ({way})':<42} "
            + " ".join(f"{f'{level} stream(s)':>16}" for level in args.levels)
        )
        for pair, by_level in splits.items():
            cells = [show(by_level[str(level)], digits=2) for level in args.levels]
            print(f"{pair:<42} " + " ".join(f"{cell:>16}" for cell in cells))
    report: dict[str, Any] = {
        "shape": args.shape,
        "tokens": args.tokens,
        "machine": [load_before, machine_load()],
        "llamacpp_commit": commit,
        "engine": args.engine,
        "gguf": args.gguf,
        "one_core_machines": args.one_core_machines,
        "interleaved": args.interleave,
        "servers": results,
        "ratios": ratios,
        "splits": splits,
        "predicted": predictions,
        "schedules": schedules,
        "notes": notes,
    }
    if args.json:
        print(json.dumps(report))
    if args.plot:
        from plots import plot_vs_llamacpp

        print(f"plot: {plot_vs_llamacpp(report, args.plot)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
