"""/health and /distributed/gpu-info: every device of the pipeline, its role, layers and status."""

from __future__ import annotations

from meshllm.engines import default_engine


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
        assert device["engine"] == default_engine() and device["device_type"] == "cpu"
        assert device["memory_total"] >= device["memory_available"] > 0
        assert {"device_id", "hostname", "rtt_ms", "weight_bytes", "live_sequences"} <= set(device)
    assert worker["rtt_ms"] > 0


def test_gpu_info_rows_keep_their_fields_and_order(http) -> None:
    body = http.get("/distributed/gpu-info").json()
    assert list(body) == ["devices", "cluster_status", "world_size", "model", "live_sequences"]
    for device in body["devices"]:
        assert list(device) == [
            "device_id",
            "name",
            "hostname",
            "address",
            "role",
            "status",
            "engine",
            "device_type",
            "memory_total",
            "memory_available",
            "weight_bytes",
            "layers",
            "live_sequences",
            "rtt_ms",
            "version",
            "error",
            "quantize",
            "in_plan",
        ]
