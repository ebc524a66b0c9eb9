"""Asking running processes how they are: a worker's gRPC Health and Info, the coordinator's HTTP routes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc
import httpx

from meshllm.transport.proto import meshllm_pb2 as pb
from meshllm.transport.proto import meshllm_pb2_grpc as pbg
from meshllm.transport.rpc import CHANNEL_OPTIONS, token_metadata


@dataclass(frozen=True)
class Answer:
    """A reply, or why there was none (`error`); `refused` when the peer rejected the cluster token."""

    reply: Any = None
    error: str = ""
    refused: bool = False

    @property
    def ok(self) -> bool:
        return self.reply is not None


def _call(address: str, method: str, request: Any, token: str | None, timeout: float) -> Answer:
    with grpc.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        try:
            reply = getattr(pbg.StageStub(channel), method)(
                request, metadata=token_metadata(token), timeout=timeout
            )
        except grpc.RpcError as error:
            code = error.code() if isinstance(error, grpc.Call) else None
            details = error.details() if isinstance(error, grpc.Call) else str(error)
            refused = code == grpc.StatusCode.UNAUTHENTICATED
            return Answer(error=f"{code.name.lower() if code else 'error'}: {details}", refused=refused)
    return Answer(reply=reply)


def worker_health(address: str, token: str | None, timeout: float = 2.0) -> Answer:
    """The worker's HealthReply (ok, loaded, model, message)."""
    return _call(address, "Health", pb.HealthRequest(), token, timeout)


def worker_info(address: str, token: str | None, timeout: float = 2.0) -> Answer:
    """The worker's InfoReply (hostname, memory, layers, version, ...)."""
    return _call(address, "Info", pb.InfoRequest(), token, timeout)


def api_get(base_url: str, path: str, api_key: str | None, timeout: float = 5.0) -> Answer:
    """GET base_url + path; reply = (status code, JSON body or text)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.get(base_url + path, headers=headers, timeout=timeout)
    except httpx.HTTPError as error:
        return Answer(error=str(error) or type(error).__name__)
    try:
        body: Any = response.json()
    except ValueError:
        body = response.text
    return Answer(reply=(response.status_code, body))


def coordinator_health(base_url: str, api_key: str | None, timeout: float = 5.0) -> Answer:
    """/health: reply = (status code, body); 200 healthy, 503 naming the devices that are not."""
    return api_get(base_url, "/health", api_key, timeout)


def gpu_info(base_url: str, api_key: str | None, timeout: float = 10.0) -> dict[str, Any] | None:
    """/distributed/gpu-info, or None when the coordinator does not answer."""
    answer = api_get(base_url, "/distributed/gpu-info", api_key, timeout)
    if answer.ok and answer.reply[0] == 200 and isinstance(answer.reply[1], dict):
        return answer.reply[1]
    return None
