"""/health, /distributed/gpu-info, /metrics, and what a client that leaves mid-reply leaves behind."""

from __future__ import annotations

import threading
import time

import httpx
from server_helpers import wait_until

LONG = {"messages": [{"role": "user", "content": "Go on and on."}], "max_tokens": 1500, "ignore_eos": True}


def test_health_is_healthy_with_every_device(http) -> None:
    response = http.get("/health")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "healthy"
    assert [device["status"] for device in body["devices"]] == ["healthy", "healthy"]


def test_gpu_info_lists_both_devices_with_their_layers(http, cluster) -> None:
    body = http.get("/distributed/gpu-info").json()
    assert body["world_size"] == 2 and body["cluster_status"] == "healthy"
    coordinator, worker = body["devices"]
    assert (coordinator["role"], coordinator["layers"], coordinator["device_id"]) == (
        "coordinator",
        [0, 2],
        0,
    )
    assert (worker["role"], worker["layers"], worker["device_id"]) == ("worker", [2, 4], 1)
    assert worker["address"] == cluster.worker_addresses[0].address
    for device in body["devices"]:
        assert device["status"] == "healthy"
        assert device["engine"] == "torch" and device["device_type"] == "cpu"
        assert device["memory_total"] >= device["memory_available"] > 0
        assert {"device_id", "hostname", "rtt_ms", "weight_bytes", "live_sequences"} <= set(device)
    assert worker["rtt_ms"] > 0


def test_metrics_count_requests_tokens_and_stage_steps(http, model) -> None:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 4,
        "ignore_eos": True,
    }
    assert http.post("/v1/chat/completions", json=body).status_code == 200
    http.post("/v1/chat/completions", json={**body, "max_tokens": 0})
    text = http.get("/metrics").text
    assert 'meshllm_requests_total{endpoint="/v1/chat/completions",status="200"}' in text
    assert 'meshllm_requests_total{endpoint="/v1/chat/completions",status="400"}' in text
    assert "meshllm_prompt_tokens_total" in text and "meshllm_generation_tokens_total" in text
    assert "meshllm_time_to_first_token_seconds_count" in text
    assert "meshllm_time_per_output_token_seconds_count" in text
    assert 'meshllm_stage_step_seconds_count{stage="coordinator"}' in text
    # Every worker reports its own compute time with each step's result; "remote chain" is the round trip.
    assert 'meshllm_stage_step_seconds_count{stage="worker1"}' in text
    assert 'meshllm_stage_step_seconds_count{stage="remote chain"}' in text
    assert "meshllm_live_sequences" in text
    generated = next(line for line in text.splitlines() if line.startswith("meshllm_generation_tokens_total"))
    assert float(generated.split()[-1]) >= 4


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
