"""Eight streams through `meshllm serve --stages 3` while its middle worker is killed: every one completes
with the text it has on an undisturbed cluster, whether the worker is started again or stays down (then
its layers are planned over the two survivors and /health says degraded, naming it)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import httpx
from server_helpers import wait_until
from test_serve_cli import Serve, free_port

MAX_TOKENS = 30
BODIES = [
    {
        "messages": [{"role": "user", "content": f"Tell me story number {i}."}],
        "max_tokens": MAX_TOKENS,
        "ignore_eos": True,
        "stream": True,
        **({"temperature": 0.0} if i < 4 else {"temperature": 1.0, "top_p": 0.9, "seed": 40 + i}),
    }
    for i in range(8)
]


def stream_eight(url: str, halfway: Callable[[], None] | None = None) -> list[tuple[str, str]]:
    """The eight requests at once, each streamed; `halfway` runs once stream 0 has half its tokens."""
    replies: list[tuple[str, str]] = [("", "")] * len(BODIES)
    failures: list[str] = []

    def one(index: int) -> None:
        pieces, finish = [], ""
        try:
            with httpx.stream("POST", f"{url}/v1/chat/completions", json=BODIES[index], timeout=180) as reply:
                for line in reply.iter_lines():
                    if not line.startswith("data: {"):
                        continue
                    event = json.loads(line[len("data: ") :])
                    if "error" in event:
                        failures.append(f"stream {index}: {event['error']}")
                        return
                    choice = event["choices"][0]
                    pieces.append(choice["delta"].get("content") or "")
                    finish = choice["finish_reason"] or finish
                    if index == 0 and halfway is not None and len(pieces) == MAX_TOKENS // 2:
                        halfway()
        except httpx.HTTPError as error:
            failures.append(f"stream {index}: {error!r}")
        replies[index] = ("".join(pieces), finish)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(BODIES))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not failures, failures
    return replies


def middle_worker_pid(serve: Serve) -> int:
    pids = serve.worker_pids()
    assert len(pids) == 2, serve.output
    return pids[0]  # worker1 runs the layers after the coordinator's, before worker2's


def test_eight_streams_survive_the_middle_worker_killed_and_started_again(
    tiny_checkpoint: Callable[..., Path],
) -> None:
    checkpoint = tiny_checkpoint(arch="qwen3", layers=4)
    serve = Serve("--model", str(checkpoint), "--stages", "3", "--port", str(free_port()))
    try:
        url = serve.wait_ready()
        expected = stream_eight(url)
        assert all(finish == "length" for _, finish in expected)
        pid = middle_worker_pid(serve)
        replies = stream_eight(url, halfway=lambda: os.kill(pid, signal.SIGKILL))
        assert "started worker1 again" in serve.output, serve.output
        assert replies == expected
        assert serve.stop(signal.SIGINT) == 0, serve.output
    finally:
        serve.kill()


def test_eight_streams_survive_the_middle_worker_staying_down_and_health_says_degraded(
    tiny_checkpoint: Callable[..., Path],
) -> None:
    checkpoint = tiny_checkpoint(arch="qwen3", layers=4)
    serve = Serve(
        "--model", str(checkpoint), "--stages", "3", "--port", str(free_port()),
        "--no-restart", "--replan-after", "1",
    )  # fmt: skip
    try:
        url = serve.wait_ready()
        expected = stream_eight(url)
        pid = middle_worker_pid(serve)
        replies = stream_eight(url, halfway=lambda: os.kill(pid, signal.SIGKILL))
        assert replies == expected
        assert "left out: worker1" in serve.output, serve.output

        health = httpx.get(f"{url}/health", timeout=10)
        assert health.status_code == 200, health.text
        body = health.json()
        assert body["status"] == "degraded" and "worker1" in body["message"], body
        assert [d["name"] for d in body["devices"] if not d["in_plan"]] == ["worker1"]
        info = httpx.get(f"{url}/distributed/gpu-info", timeout=10).json()
        assert info["cluster_status"] == "degraded"
        running = [d["layers"] for d in info["devices"] if d["in_plan"]]
        assert running == [[0, 2], [2, 4]]  # the two survivors hold every layer
        # It goes on serving, degraded.
        assert wait_until(lambda: httpx.get(f"{url}/health", timeout=5).json()["status"] == "degraded", 5)
        assert stream_eight(url) == expected
        assert serve.stop(signal.SIGINT) == 0, serve.output
    finally:
        serve.kill()


def test_a_negative_replan_delay_is_refused_naming_the_flag() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "meshllm", "serve", "--replan-after", "-1", "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "--replan-after must not be negative, got -1" in result.stderr + result.stdout
