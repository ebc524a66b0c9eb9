"""A client that leaves mid-reply, streamed or not, cancels its sequence: every stage frees its cache."""

from __future__ import annotations

import threading
import time

import httpx
from server_helpers import wait_until

LONG = {"messages": [{"role": "user", "content": "Go on and on."}], "max_tokens": 1500, "ignore_eos": True}


def live_everywhere(http) -> list[int]:
    body = http.get("/distributed/gpu-info").json()
    return [body["live_sequences"]] + [device["live_sequences"] for device in body["devices"]]


def test_disconnecting_mid_stream_frees_every_stage(cluster, http, model) -> None:
    with httpx.Client(base_url=cluster.url, timeout=30) as client:
        with client.stream(
            "POST", "/v1/chat/completions", json={**LONG, "model": model, "stream": True}
        ) as response:
            lines = response.iter_lines()
            content_chunks = 0
            while content_chunks < 5:
                content_chunks += '"content"' in next(lines)
            assert max(live_everywhere(http)) == 1  # generating, on every stage
        # leaving the block closes the connection mid-stream
    assert wait_until(lambda: live_everywhere(http) == [0, 0, 0], timeout=2.0), live_everywhere(http)


def test_disconnecting_before_a_non_streamed_reply_frees_every_stage(cluster, http, model) -> None:
    def impatient_client() -> None:
        with httpx.Client(base_url=cluster.url, timeout=0.5) as client:
            try:
                client.post("/v1/chat/completions", json={**LONG, "model": model})
            except httpx.TimeoutException:
                pass

    thread = threading.Thread(target=impatient_client)
    thread.start()
    assert wait_until(lambda: max(live_everywhere(http)) == 1, timeout=5.0)
    thread.join()
    started = time.monotonic()
    assert wait_until(lambda: live_everywhere(http) == [0, 0, 0], timeout=2.0), live_everywhere(http)
    assert time.monotonic() - started < 2.0
