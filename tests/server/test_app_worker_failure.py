"""A worker that dies: its streams end with an error event, /health turns 503 naming it, new requests 503.

This module has a cluster of its own, since it kills the worker."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from server_helpers import ClusterServer, wait_until

LONG = {"messages": [{"role": "user", "content": "Go on and on."}], "max_tokens": 1500, "ignore_eos": True}


@pytest.fixture(scope="module")
def doomed(tiny_checkpoint: Callable[..., Path]) -> Iterator[ClusterServer]:
    # Nothing starts the worker again here: with no wait for it, streams end at once (replay: test_replay).
    server = ClusterServer(tiny_checkpoint(arch="qwen3", layers=4), replay_timeout=0.0).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def killed(doomed: ClusterServer) -> ClusterServer:
    """The cluster with its worker killed (SIGKILL by pid), whether or not a test did it already."""
    process = doomed.workers.workers[0].process
    if process.poll() is None:
        os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=10)
    return doomed


def test_killing_the_worker_mid_stream_ends_the_stream_with_an_error_event(doomed: ClusterServer) -> None:
    with httpx.Client(base_url=doomed.url, timeout=30) as client:
        with client.stream("POST", "/v1/chat/completions", json={**LONG, "stream": True}) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            content_chunks = 0
            while content_chunks < 3:
                content_chunks += '"content"' in next(lines)
            os.kill(doomed.worker_pid, signal.SIGKILL)
            killed_at = time.monotonic()
            rest = [line for line in lines if line.startswith("data: ")]
    assert time.monotonic() - killed_at < 10, "the stream must end within seconds, never hang"
    assert rest[-1] == "data: [DONE]"
    error = httpx.Response(200, content=rest[-2][len("data: ") :]).json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert "worker1" in error["message"]


def test_health_turns_503_naming_the_dead_worker(killed: ClusterServer) -> None:
    with httpx.Client(base_url=killed.url, timeout=10) as client:
        assert wait_until(lambda: client.get("/health").status_code == 503, timeout=5.0)
        body = client.get("/health").json()
    assert body["status"] == "unhealthy"
    assert "worker1" in body["message"]
    assert {device["name"]: device["status"] for device in body["devices"]} == {
        "coordinator": "healthy",
        "worker1": "unreachable",
    }


def test_new_requests_get_a_503_naming_the_dead_worker(killed: ClusterServer) -> None:
    with httpx.Client(base_url=killed.url, timeout=10) as client:
        assert wait_until(lambda: client.get("/health").status_code == 503, timeout=5.0)
        for body in (LONG, {**LONG, "stream": True}):
            response = client.post("/v1/chat/completions", json=body)
            assert response.status_code == 503
            assert response.headers["retry-after"] == "5"
            error = response.json()["error"]
            assert "worker1" in error["message"] and error["type"] == "server_error"
        info = client.get("/distributed/gpu-info").json()
    assert info["cluster_status"] == "degraded"
    assert [device["status"] for device in info["devices"]] == ["healthy", "unreachable"]


def test_messages_get_a_503_overloaded_error_naming_the_dead_worker(killed: ClusterServer) -> None:
    body = {"model": killed.coordinator.model.name, "messages": LONG["messages"], "max_tokens": 5}
    with httpx.Client(base_url=killed.url, timeout=10) as client:
        assert wait_until(lambda: client.get("/health").status_code == 503, timeout=5.0)
        for stream in (False, True):
            response = client.post("/v1/messages", json={**body, "stream": stream})
            assert response.status_code == 503
            assert response.headers["retry-after"] == "5"
            assert response.json()["type"] == "error"
            error = response.json()["error"]
            assert error["type"] == "overloaded_error" and "worker1" in error["message"]
