"""Weights over the cluster: the Weights service (Share, Fetch) and the blocking client a worker uses.

The service serves a `WeightSource` (the runtime provides one around a checkpoint): the file list of a
layer range's share, and each file's bytes in chunks of a few MB with the sha256 of the whole file on
the last one. Like every call, both need the cluster token. The client runs on a worker's compute thread
while it loads, so it is the plain blocking gRPC API.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import grpc

from meshllm.errors import ConfigError, StageError
from meshllm.step import LayerRange
from meshllm.transport.proto import meshllm_pb2 as pb
from meshllm.transport.proto import meshllm_pb2_grpc as pbg
from meshllm.transport.rpc import CHANNEL_OPTIONS, SERVER_OPTIONS, token_metadata, token_problem
from meshllm.transport.tls import TlsFiles, add_port, blocking_channel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShareEntry:
    name: str
    size: int  # bytes


class WeightSource(Protocol):
    """A checkpoint that can be handed out in shares. Both methods block (they read files)."""

    key: str  # the checkpoint's content key

    def share(self, layer_range: LayerRange) -> list[ShareEntry]:
        """The files of the range's share; ConfigError for a range the checkpoint does not have."""
        ...

    def chunks(self, layer_range: LayerRange, name: str) -> Iterator[bytes]:
        """One share file's bytes; ConfigError for a name not in the share."""
        ...


class WeightsService(pbg.WeightsServicer):
    def __init__(self, source: WeightSource, token: str | None, name: str):
        self.source = source
        self.token = token
        self.name = name
        self.readers = ThreadPoolExecutor(max_workers=4, thread_name_prefix="weights")

    async def _check(self, key: str, context: grpc.aio.ServicerContext) -> None:
        problem = token_problem(self.token, dict(context.invocation_metadata() or ()))
        if problem:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, f"{self.name}: the call carried {problem}")
        if key != self.source.key:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"{self.name} serves checkpoint {self.source.key[:12]}, not {key[:12] or '(none)'}",
            )

    async def Share(self, request: pb.ShareRequest, context: grpc.aio.ServicerContext) -> pb.ShareReply:
        await self._check(request.key, context)
        layer_range = LayerRange(request.layer_start, request.layer_end)
        loop = asyncio.get_running_loop()
        try:
            entries = await loop.run_in_executor(self.readers, self.source.share, layer_range)
        except ConfigError as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{self.name}: {error}")
        return pb.ShareReply(files=[pb.ShareFile(name=entry.name, size=entry.size) for entry in entries])

    async def Fetch(self, request: pb.FetchRequest, context: grpc.aio.ServicerContext):  # type: ignore[no-untyped-def]
        await self._check(request.key, context)
        layer_range = LayerRange(request.layer_start, request.layer_end)
        loop = asyncio.get_running_loop()
        try:
            chunks = await loop.run_in_executor(self.readers, self.source.chunks, layer_range, request.name)
        except ConfigError as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{self.name}: {error}")
        digest = hashlib.sha256()
        sent = 0

        def read() -> bytes:  # on a reader thread, hashing included (hashlib lets go of the GIL)
            chunk = next(chunks, b"")
            digest.update(chunk)
            return chunk

        try:
            while chunk := await loop.run_in_executor(self.readers, read):  # the event loop only moves bytes
                sent += len(chunk)
                await context.write(pb.FileChunk(data=chunk))
        except (OSError, ConfigError) as error:
            log.warning("sending %s failed: %s", request.name, error)
            await context.abort(grpc.StatusCode.INTERNAL, f"{self.name}: reading {request.name}: {error}")
        await context.write(pb.FileChunk(sha256=digest.hexdigest()))
        log.info(
            "sent %s of layers %s (%.1f MB) to %s", request.name, layer_range, sent / 1e6, context.peer()
        )


class WeightsServer:
    """The Weights service on its own gRPC server (the coordinator serves no stage protocol)."""

    def __init__(
        self, source: WeightSource, address: str, token: str | None, name: str, tls: TlsFiles | None = None
    ):
        self.source = source
        self.address = address
        self.token = token
        self.tls = tls  # mutual TLS with the cluster CA, like the stage links; None: plaintext
        self.name = name
        self._server: grpc.aio.Server | None = None
        self._service: WeightsService | None = None

    async def start(self) -> None:
        """Listen on `address`; OSError when the port cannot be bound."""
        server = grpc.aio.server(options=SERVER_OPTIONS)
        self._service = WeightsService(self.source, self.token, self.name)
        pbg.add_WeightsServicer_to_server(self._service, server)  # type: ignore[no-untyped-call]
        try:
            add_port(server, self.address, self.tls)
        except OSError as error:
            raise OSError(
                f"cannot listen on {self.address} for weights: {error} (is the port in use?)"
            ) from None
        await server.start()
        self._server = server
        log.info("serving the weights of checkpoint %s on %s", self.source.key[:12], self.address)

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(grace=1.0)
            self._server = None
        if self._service is not None:
            self._service.readers.shutdown(wait=False, cancel_futures=True)


class WeightsClient:
    """Blocking calls to one Weights service (a worker's compute thread makes them while it loads)."""

    def __init__(self, address: str, token: str | None, key: str, tls: TlsFiles | None = None):
        self.address = address
        self.key = key
        self._metadata = token_metadata(token)
        self._channel = blocking_channel(address, tls, CHANNEL_OPTIONS)
        self._stub = pbg.WeightsStub(self._channel)  # type: ignore[no-untyped-call]

    def _error(self, error: grpc.RpcError) -> StageError:
        code = error.code() if callable(getattr(error, "code", None)) else None  # type: ignore[attr-defined]
        details = error.details() if callable(getattr(error, "details", None)) else str(error)  # type: ignore[attr-defined]
        if code == grpc.StatusCode.UNAVAILABLE:
            return StageError(
                f"the weights at {self.address} are unreachable ({details}); "
                "can this device reach the coordinator's weights port?"
            )
        return StageError(f"weights from {self.address}: {details}")

    def share(self, layer_range: LayerRange, timeout: float = 60.0) -> list[ShareEntry]:
        request = pb.ShareRequest(key=self.key, layer_start=layer_range.start, layer_end=layer_range.end)
        try:
            reply = self._stub.Share(request, metadata=self._metadata, timeout=timeout)
        except grpc.RpcError as error:
            raise self._error(error) from None
        return [ShareEntry(file.name, file.size) for file in reply.files]

    def fetch(self, layer_range: LayerRange, name: str, write: Callable[[bytes], None]) -> str:
        """Stream one share file into `write`, a chunk at a time; returns the sha256 the sender computed."""
        request = pb.FetchRequest(
            key=self.key, layer_start=layer_range.start, layer_end=layer_range.end, name=name
        )
        sha256 = ""
        try:
            for chunk in self._stub.Fetch(request, metadata=self._metadata):
                if chunk.data:
                    write(chunk.data)
                if chunk.sha256:
                    sha256 = chunk.sha256
        except grpc.RpcError as error:
            raise self._error(error) from None
        if not sha256:
            raise StageError(f"weights from {self.address}: {name} ended without its sha256")
        return sha256

    def close(self) -> None:
        self._channel.close()
