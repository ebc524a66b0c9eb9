"""The console at `/` and its `/console/stats`, served by the real 2-stage test cluster (one app open,
one with an API key)."""

from __future__ import annotations

import re

import httpx
from server_helpers import API_KEY, ClusterServer, wait_until

# What a page without the key may show: no more than /health and /distributed/gpu-info already do.
LOCKED_FIELDS = {"model", "cluster_status", "devices", "num_layers", "live_sequences", "locked"}


def test_the_page_and_its_assets_come_from_the_package_and_nothing_else_is_loaded(
    http: httpx.Client,
) -> None:
    page = http.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "script-src 'self'" in policy and "connect-src 'self'" in policy
    references = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert sorted(references) == ["/console/static/console.css", "/console/static/console.js"]
    assert "<script>" not in page.text  # no inline script: the policy would refuse it
    script = http.get("/console/static/console.js")
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    assert "/console/stats" in script.text and "/v1/chat/completions" in script.text
    assert "http://" not in script.text.replace("http://www.w3.org/2000/svg", "")
    style = http.get("/console/static/console.css")
    assert style.status_code == 200 and style.headers["content-type"].startswith("text/css")
    assert http.get("/console/static/missing.js").status_code == 404


def test_stats_show_the_devices_and_plan_as_gpu_info_does(http: httpx.Client, model: str) -> None:
    stats = http.get("/console/stats").json()
    gpu_info = http.get("/distributed/gpu-info").json()
    assert stats["locked"] is False
    assert stats["model"] == gpu_info["model"] == model
    assert stats["cluster_status"] == "healthy"
    keys = ("name", "address", "role", "status", "engine", "device_type", "layers", "memory_total")
    assert [{key: device[key] for key in keys} for device in stats["devices"]] == [
        {key: device[key] for key in keys} for device in gpu_info["devices"]
    ]
    assert [device["layers"] for device in stats["devices"]] == [[0, 2], [2, 4]]
    assert stats["num_layers"] == 4
    assert stats["max_context"] > 0
    series = stats["series"]
    assert series["seconds"] == 300
    assert len(series["tokens_per_second"]) == len(series["time_to_first_token_ms"]) == 300


def test_stats_plot_the_tokens_first_token_times_and_step_times_of_requests(
    http: httpx.Client, model: str
) -> None:
    def series() -> dict:
        return http.get("/console/stats").json()["series"]

    before = sum(series()["tokens_per_second"])
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 6,
        "ignore_eos": True,
    }
    assert http.post("/v1/chat/completions", json=body).status_code == 200
    # A second is plotted once it is over.
    assert wait_until(lambda: sum(series()["tokens_per_second"]) >= before + 6, 10)
    latest = series()
    assert any(value is not None and value > 0 for value in latest["time_to_first_token_ms"])
    assert {"coordinator", "worker1", "remote chain"} <= set(latest["stage_step_ms"])
    for values in latest["stage_step_ms"].values():
        assert len(values) == 300 and any(value is not None for value in values)


def test_without_the_key_stats_say_only_what_health_and_gpu_info_say(cluster: ClusterServer) -> None:
    with httpx.Client(base_url=cluster.keyed_url, timeout=30) as http:
        stats = http.get("/console/stats")
        assert stats.status_code == 200
        body = stats.json()
        assert body["locked"] is True
        assert {key for key, value in body.items() if value is not None} == LOCKED_FIELDS
        gpu_info = http.get("/distributed/gpu-info").json()  # open, with or without a key
        assert body["model"] == gpu_info["model"]
        assert [device["name"] for device in body["devices"]] == [d["name"] for d in gpu_info["devices"]]
        assert http.get("/").status_code == 200  # the page itself holds nothing of the cluster


def test_a_wrong_key_is_refused_and_the_right_one_unlocks_the_stats(cluster: ClusterServer) -> None:
    with httpx.Client(base_url=cluster.keyed_url, timeout=30) as http:
        wrong = http.get("/console/stats", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        assert wrong.headers["www-authenticate"] == "Bearer"
        assert wrong.json()["error"]["code"] == "invalid_api_key"
        right = http.get("/console/stats", headers={"Authorization": f"Bearer {API_KEY}"}).json()
        assert right["locked"] is False
        assert right["series"]["seconds"] == 300 and right["max_context"] > 0


def test_a_device_that_is_down_shows_degraded_with_its_error() -> None:
    from fake_engine import FakeEngine, device
    from fastapi.testclient import TestClient

    from meshllm.server.app import build_app

    engine = FakeEngine()
    error = "the local worker worker1 (pid 4121) exited with signal SIGKILL; starting it again in 1 s"
    engine.devices_now = [device(0, "coordinator"), device(1, "worker1", "unreachable", error)]
    engine.healthy = False
    with TestClient(build_app(engine)) as http:
        stats = http.get("/console/stats").json()
    assert stats["cluster_status"] == "degraded"
    assert [(d["name"], d["status"], d["error"]) for d in stats["devices"]] == [
        ("coordinator", "healthy", ""),
        ("worker1", "unreachable", error),
    ]
    assert stats["num_layers"] == 4
