"""Asking the coordinator how it is, over its HTTP API: /health and /distributed/gpu-info.

(Workers are asked over gRPC, through `meshllm.transport.probe`.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import httpx
from pydantic import TypeAdapter, ValidationError

from meshllm.devices import DeviceStatus

GPU_INFO_PATH = "/distributed/gpu-info"
_DEVICES = TypeAdapter(list[DeviceStatus])


@dataclass(frozen=True)
class HttpReply:
    status: int  # the HTTP status code
    body: Any  # the JSON body, or the text of one that is not JSON


@dataclass(frozen=True)
class Answer:
    """The coordinator's reply, or why there was none (`error`)."""

    reply: HttpReply | None = None
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.reply is not None


@dataclass(frozen=True)
class GpuInfo:
    """What `cluster status` reads of /distributed/gpu-info: the devices, first stage first."""

    devices: list[DeviceStatus] = field(default_factory=list)
    cluster_status: str = "?"  # healthy | degraded
    model: str = "?"


@dataclass(frozen=True)
class GpuInfoAnswer:
    """The parsed gpu-info; None when the coordinator does not answer (`problem` is empty) or answers
    something that does not parse (`problem` says what, in one line)."""

    info: GpuInfo | None = None
    problem: str = ""


def api_get(base_url: str, path: str, api_key: str | None, timeout: float = 5.0) -> Answer:
    """GET base_url + path."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.get(base_url + path, headers=headers, timeout=timeout)
    except httpx.HTTPError as error:
        return Answer(error=str(error) or type(error).__name__)
    try:
        body: Any = response.json()
    except ValueError:
        body = response.text
    return Answer(reply=HttpReply(response.status_code, body))


def coordinator_health(base_url: str, api_key: str | None, timeout: float = 5.0) -> Answer:
    """/health: status 200 healthy, 503 with a body naming the devices that are not."""
    return api_get(base_url, "/health", api_key, timeout)


def gpu_info(base_url: str, api_key: str | None, timeout: float = 10.0) -> GpuInfoAnswer:
    """/distributed/gpu-info, parsed into the API's device model."""
    answer = api_get(base_url, GPU_INFO_PATH, api_key, timeout)
    if answer.reply is None or answer.reply.status != 200:
        return GpuInfoAnswer()
    try:
        return GpuInfoAnswer(info=parse_gpu_info(answer.reply.body))
    except ValueError as error:
        return GpuInfoAnswer(
            problem=f"the coordinator answered {GPU_INFO_PATH} with something unexpected ({error})"
        )


def parse_gpu_info(body: Any) -> GpuInfo:
    """The devices (and the cluster's state and model) of a gpu-info body; ValueError, in one line,
    when it is not one."""
    if not isinstance(body, dict):
        raise ValueError(f"not a JSON object: {_short(repr(body))}")
    try:
        devices = _DEVICES.validate_python(body.get("devices"))
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in ("devices", *first["loc"]))
        raise ValueError(f"{where}: {first['msg']}, got {_short(repr(first.get('input')))}") from None
    return GpuInfo(
        devices=devices,
        cluster_status=str(body.get("cluster_status", "?")),
        model=str(body.get("model", "?")),
    )


def _short(text: str, limit: int = 80) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
