"""One stage asked from a command-line tool: blocking (no event loop) Health and Info calls.

`meshllm cluster` uses these to see whether a worker runs and answers, and what it has loaded. A call
never raises for a failed RPC: it answers a `Probe` with the typed reply, or one line saying why there
is none, and whether the stage refused the cluster token. With a `TlsFiles` the call goes over mutual TLS.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import grpc

from meshllm.devices import StageInfo
from meshllm.transport import rpc
from meshllm.transport.codec import decode_info
from meshllm.transport.proto import meshllm_pb2 as pb
from meshllm.transport.proto import meshllm_pb2_grpc as pbg
from meshllm.transport.stage import Health
from meshllm.transport.tls import TlsFiles, blocking_channel

Reply = TypeVar("Reply")
DEFAULT_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class Probe(Generic[Reply]):
    """The reply of one call, or why there was none (`error`, one line); `refused` when the stage
    answered but rejected the cluster token."""

    reply: Reply | None = None
    error: str = ""
    refused: bool = False

    @property
    def ok(self) -> bool:
        return self.reply is not None


def stage_health(
    address: str,
    token: str | None,
    timeout: float = DEFAULT_TIMEOUT_S,
    device: str = "worker",
    tls: TlsFiles | None = None,
) -> Probe[Health]:
    """Ask the stage at `address` for its Health (an answer means it runs and takes the token: the
    model it has loaded, "" before its first Load, and what it does); `device` names it in the error."""

    def call(stub: pbg.StageStub) -> Health:
        reply = stub.Health(pb.HealthRequest(), metadata=rpc.token_metadata(token), timeout=timeout)
        return Health(model=reply.model, message=reply.message)

    return _probe(address, device, call, tls)


def stage_info(
    address: str,
    token: str | None,
    timeout: float = DEFAULT_TIMEOUT_S,
    device: str = "worker",
    tls: TlsFiles | None = None,
) -> Probe[StageInfo]:
    """Ask the stage at `address` for its Info (machine, memory, loaded layers, version); over mutual
    TLS with `tls`."""

    def call(stub: pbg.StageStub) -> StageInfo:
        reply = stub.Info(pb.InfoRequest(), metadata=rpc.token_metadata(token), timeout=timeout)
        return decode_info(reply)

    return _probe(address, device, call, tls)


def _probe(
    address: str, device: str, call: Callable[[pbg.StageStub], Reply], tls: TlsFiles | None
) -> Probe[Reply]:
    with blocking_channel(address, tls, rpc.CHANNEL_OPTIONS) as channel:
        try:
            return Probe(reply=call(pbg.StageStub(channel)))
        except grpc.RpcError as error:
            explained = rpc.explain(error, device, address, secure=tls is not None)
            line = " ".join(explained.split())  # details may span lines
            return Probe(error=line, refused=rpc.is_refusal(error))
