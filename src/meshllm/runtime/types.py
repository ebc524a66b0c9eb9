"""Typed payloads the runtime hands to the HTTP server and the cluster tools."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from meshllm.errors import MeshError

FinishReason = Literal["stop", "length"]  # an eos or stop token or string; max_tokens reached


class PipelineError(MeshError):
    """A sequence could not be completed: a stage failed or is unreachable. The message names the device."""


class PipelineUnavailable(PipelineError):
    """The pipeline cannot take new sequences now (a device is down); the message names it."""


@dataclass(frozen=True)
class GeneratedToken:
    token_id: int
    logprob: float
    finish_reason: FinishReason | None = None  # "stop" (an eos token), "length" (max_tokens) or None


@dataclass(frozen=True)
class DeviceStatus:
    """One device of the cluster as the coordinator sees it (the rows of /distributed/gpu-info)."""

    device_id: int  # the stage index: 0 is the first stage
    name: str
    hostname: str
    address: str  # "host:port" for a worker, "local" for the coordinator's own stage
    role: str  # "coordinator" | "worker"
    status: str  # "healthy" | "unreachable" | "not loaded" | "error"
    engine: str
    device_type: str  # cpu | cuda | mps | metal
    memory_total: int  # bytes
    memory_available: int
    weight_bytes: int
    layers: tuple[int, int]
    live_sequences: int
    rtt_ms: float | None
    version: str
    error: str = ""
