"""The `Comm` service of one rank: answers `Hello`, checks the cluster token, and reads the streams
that peers keep open to this rank, putting every whole message in the mailbox.

One server thread per incoming stream reads its parts (wire.py), joins the parts of a large message
into one buffer as they arrive, and tells the links (links.py) when the stream ends: after a goodbye (the peer
closed its communicator) or without one (the peer is gone).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import grpc
import numpy as np

from meshllm.transport.comm.mailbox import Arrival
from meshllm.transport.comm.wire import RANK_KEY, SERVICE, Part, Payload, parse_part
from meshllm.transport.proto import comm_pb2
from meshllm.transport.rpc import TOKEN_METADATA_KEY, token_problem
from meshllm.transport.tensors import numpy_dtype

if TYPE_CHECKING:
    from meshllm.transport.comm.links import Links


class _Assembly:
    """A message arriving in parts, copied into one buffer as the parts come (each is freed at once)."""

    def __init__(self, first: Part) -> None:
        itemsize = numpy_dtype(first.dtype).itemsize
        self.buffer = np.empty(int(np.prod(first.shape, dtype=np.int64)) * itemsize, dtype=np.uint8)
        self.filled = 0
        self.parts = 0
        self.add(first.data)

    def add(self, data: memoryview | None) -> bool:
        """Append one part's data; False if it does not fit."""
        size = 0 if data is None else len(data)
        if self.filled + size > len(self.buffer):
            return False
        if data is not None and size:
            self.buffer[self.filled : self.filled + size] = np.frombuffer(data, dtype=np.uint8)
        self.filled += size
        self.parts += 1
        return True

    @property
    def complete(self) -> bool:
        return self.filled == len(self.buffer)


class CommServicer:
    """The `Comm` service of one rank: answers `Hello` and puts arriving messages in the mailbox."""

    def __init__(self, links: Links) -> None:
        self.links = links

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Hello": grpc.unary_unary_rpc_method_handler(
                    self.Hello,
                    request_deserializer=comm_pb2.CommHelloRequest.FromString,
                    response_serializer=comm_pb2.CommHelloReply.SerializeToString,
                ),
                # Parts arrive as bytes and are read by comm_wire, without copying their data.
                "Exchange": grpc.stream_unary_rpc_method_handler(
                    self.Exchange, response_serializer=comm_pb2.CommStreamSummary.SerializeToString
                ),
            },
        )

    def _authorize(self, context: grpc.ServicerContext) -> None:
        problem = token_problem(self.links.token, dict(context.invocation_metadata() or ()))
        if problem is not None:
            context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                f"rank {self.links.rank}: the call carried {problem} ({TOKEN_METADATA_KEY} metadata)",
            )

    def Hello(
        self, request: comm_pb2.CommHelloRequest, context: grpc.ServicerContext
    ) -> comm_pb2.CommHelloReply:
        self._authorize(context)
        rank, world_size = self.links.rank, self.links.world_size
        if request.world_size != world_size:
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"rank {rank} is one of {world_size} ranks, the caller (rank {request.rank}) "
                f"one of {request.world_size}",
            )
        if not 0 <= request.rank < world_size or request.rank == rank:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"rank {request.rank} is not a peer of rank {rank}"
            )
        return comm_pb2.CommHelloReply(rank=rank, world_size=world_size)

    def Exchange(
        self, request_iterator: Iterator[bytes], context: grpc.ServicerContext
    ) -> comm_pb2.CommStreamSummary:
        self._authorize(context)
        links = self.links
        source_text = str(dict(context.invocation_metadata() or ()).get(RANK_KEY, ""))
        if not source_text.isdigit() or not 0 <= int(source_text) < links.world_size:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"no valid {RANK_KEY} metadata")
        source = int(source_text)
        links.incoming_opened(source)
        received = 0  # whole messages
        first: Part | None = None  # the first part of a message still coming in parts
        assembly: _Assembly | None = None
        said_goodbye = False
        try:
            for raw in request_iterator:
                part = parse_part(raw)
                if first is None and part.goodbye:
                    said_goodbye = True
                elif first is None:
                    if part.seq != received or part.source != source:
                        context.abort(
                            grpc.StatusCode.DATA_LOSS,
                            f"expected message {received} from rank {source}, "
                            f"got message {part.seq} from rank {part.source}",
                        )
                    received += 1
                    if part.parts > 1:
                        first, assembly = part, _Assembly(part)
                    else:
                        self._deliver(part, part.data)
                else:
                    assert assembly is not None
                    if not assembly.add(part.data):
                        context.abort(
                            grpc.StatusCode.DATA_LOSS,
                            f"message {received - 1}: more data than its tensor holds",
                        )
                    if assembly.parts == first.parts:
                        if not assembly.complete:
                            context.abort(
                                grpc.StatusCode.DATA_LOSS,
                                f"message {received - 1}: less data than its tensor holds",
                            )
                        self._deliver(first, assembly.buffer)
                        first = assembly = None
        except grpc.RpcError:
            pass  # the call was cancelled: the peer died, or this server is stopping
        finally:
            # Clean only after a goodbye: when the peer's process dies, gRPC may end the stream as if the
            # peer had closed it before it reports the cancellation.
            links.incoming_ended(source, clean=said_goodbye and first is None)
        return comm_pb2.CommStreamSummary(messages=received)

    def _deliver(self, first: Part, data: memoryview | np.ndarray | None) -> None:
        payload = Payload(data, first.shape, first.dtype) if first.has_tensor and data is not None else None
        key = (first.channel, first.source, first.tag)
        self.links.mailbox.put(key, Arrival(first.source, first.collective, payload))
