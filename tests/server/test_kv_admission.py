"""KV admission by bytes, end to end: `meshllm serve --stages 2 --kv-memory ...` (a real process with a
real local worker) gives each stage room for the caches of two requests. Six requests at once all
complete with the text each gives alone, the later ones waiting (seen in /metrics) until room frees;
a request that could never fit is a 400 naming the stage and its limit."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from test_serve_cli import Serve, free_port

from meshllm.cli.serve import kv_share
from meshllm.cli.worker import parse_kv_memory, parse_size

# The tiny checkpoint's stages hold 2 layers of 2 KV heads of 16 dims in float32: 512 bytes per token.
BYTES_PER_TOKEN = 512
PROMPT_TOKENS, MAX_TOKENS = 10, 60  # each request's caches may grow to 70 tokens
KV_TOKENS = 150  # room for two requests on every stage, not three
WAITING = re.compile(r"^meshllm_waiting_sequences (\S+)$", re.MULTILINE)


def completion(url: str, index: int, max_tokens: int = MAX_TOKENS) -> httpx.Response:
    prompt = [5 + index, 17, 42, 99, 3, 250, 7, 61, 128, 11][:PROMPT_TOKENS]
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=120)


def waiting(url: str) -> int:
    match = WAITING.search(httpx.get(f"{url}/metrics", timeout=10).text)
    assert match, "the waiting gauge is missing from /metrics"
    return int(float(match.group(1)))


@pytest.mark.slow
def test_a_small_kv_memory_makes_later_arrivals_wait_and_none_fail(
    tiny_checkpoint: Callable[..., Path],
) -> None:
    checkpoint = tiny_checkpoint(arch="qwen3", layers=4)
    kv_memory = str(KV_TOKENS * BYTES_PER_TOKEN)
    serve = Serve(
        "--model", str(checkpoint), "--stages", "2", "--port", str(free_port()), "--kv-memory", kv_memory
    )
    try:
        url = serve.wait_ready()
        assert (
            f"KV caches may take 0.1 MB, {KV_TOKENS} tokens at {BYTES_PER_TOKEN} bytes each" in serve.output
        )
        alone = [completion(url, index).json()["choices"][0]["text"] for index in range(6)]

        seen_waiting: list[int] = []
        done = threading.Event()

        def watch() -> None:
            while not done.is_set():
                seen_waiting.append(waiting(url))

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        with ThreadPoolExecutor(6) as pool:
            replies = list(pool.map(lambda index: completion(url, index), range(6)))
        done.set()
        watcher.join(timeout=30)

        assert [reply.status_code for reply in replies] == [200] * 6, [r.text for r in replies]
        assert [reply.json()["usage"]["completion_tokens"] for reply in replies] == [MAX_TOKENS] * 6
        assert [reply.json()["choices"][0]["text"] for reply in replies] == alone
        assert max(seen_waiting) >= 1, seen_waiting  # later arrivals waited for room
        assert waiting(url) == 0

        too_long = completion(url, 0, max_tokens=KV_TOKENS)  # 160 tokens of caches: never fits
        assert too_long.status_code == 400
        error = too_long.json()["error"]
        assert error["type"] == "invalid_request_error"
        assert re.search(
            r"needs 0\.1 MB of KV cache on device '\w+', whose KV memory limit is 0\.1 MB \(150 tokens\)",
            error["message"],
        ), error
    finally:
        serve.kill()


def test_kv_memory_takes_sizes_with_units() -> None:
    assert [parse_size(text) for text in ("2G", "512M", "64k", "1.5GB", "1000")] == [
        2 * 10**9,
        512 * 10**6,
        64 * 10**3,
        1_500_000_000,
        1000,
    ]


def test_kv_memory_takes_a_share_of_free_memory_and_serve_splits_its_default() -> None:
    assert parse_kv_memory("40%") == 0.4 and parse_kv_memory("2G") == 2 * 10**9
    assert kv_share(1) is None  # one stage here: its own default, 80% of the free memory
    assert kv_share(4) == pytest.approx(0.2)  # four stages on one machine: a quarter of the 80% each


@pytest.mark.parametrize("command", ["worker", "serve"])
def test_a_bad_kv_memory_is_refused_naming_the_flag(command: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "meshllm", command, "--kv-memory", "lots"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "--kv-memory: 'lots' is not a size such as 512M or 2G" in result.stderr


def test_a_share_out_of_range_is_refused_naming_the_flag() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "meshllm", "worker", "--kv-memory", "150%"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "'150%' is not a share between 0% and 100%" in result.stderr
