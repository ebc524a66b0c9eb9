"""Fixtures of the server tests: one 2-stage cluster and its clients, shared by every server test module."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from server_helpers import ClusterServer


@pytest.fixture(scope="session")
def cluster(tiny_checkpoint: Callable[..., Path]) -> Iterator[ClusterServer]:
    server = ClusterServer(tiny_checkpoint(arch="qwen3", layers=4)).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def http(cluster: ClusterServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=cluster.url, timeout=60) as client:
        yield client


@pytest.fixture(scope="session")
def client(cluster: ClusterServer) -> Any:
    from openai import OpenAI

    return OpenAI(base_url=f"{cluster.url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="session")
def model(cluster: ClusterServer) -> str:
    return cluster.coordinator.model.name
