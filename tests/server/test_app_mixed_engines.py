"""A cluster that mixes engines: a torch coordinator and an MLX worker answer through the HTTP API."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import httpx
import pytest

from tests.conftest import free_port

pytest.importorskip("mlx.core")


def test_a_torch_coordinator_and_an_mlx_worker_answer_a_chat_request(tiny_checkpoint, start_workers):
    path = tiny_checkpoint("qwen3")
    (worker,) = start_workers(1, token="mixed-token", engine="mlx", prefix="mlx")
    port = free_port()
    command = [sys.executable, "-m", "meshllm", "serve", "--model", str(path), "--engine", "torch"]
    command += ["--workers", f"{worker.name}={worker.address}", "--token", "mixed-token", "--port", str(port)]
    command += ["--weights-port", str(free_port())]  # not the API's + 1, which nothing checked free
    serve = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert serve.poll() is None, "meshllm serve exited during start"
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the mixed cluster did not become healthy"
            time.sleep(0.3)

        reply = httpx.post(
            f"{url}/v1/chat/completions",
            json={"model": path.name, "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 8},
            timeout=60,
        )
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] >= 1

        devices = httpx.get(f"{url}/distributed/gpu-info", timeout=10).json()["devices"]
        assert [(d["role"], d["engine"]) for d in devices] == [("coordinator", "torch"), ("worker", "mlx")]
        assert devices[0]["layers"][1] == devices[1]["layers"][0]
    finally:
        serve.send_signal(signal.SIGINT)
        serve.wait(timeout=30)
