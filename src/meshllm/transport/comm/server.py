"""The `Comm` service of one rank: answers `Hello` (the rendezvous, which also says on which port this
rank takes framed links), checks the cluster token, and reads the `Exchange` streams of peers whose
messages come over gRPC rather than over a framed link (framed.py).

One server thread per incoming stream hands its parts to an `IncomingStream` (incoming.py, shared with
the framed links), which puts every whole message in the mailbox, and tells the links (links.py) when
the stream ends: after a goodbye (the peer closed its communicator) or without one (the peer is gone).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import grpc

from meshllm.transport.comm.incoming import IncomingStream, StreamError
from meshllm.transport.comm.wire import RANK_KEY, SERVICE
from meshllm.transport.proto import comm_pb2
from meshllm.transport.rpc import TOKEN_METADATA_KEY, token_problem

if TYPE_CHECKING:
    from meshllm.transport.comm.links import Links


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
        links = self.links
        return comm_pb2.CommHelloReply(
            rank=rank, world_size=world_size, link_port=links.link_port, link_socket=links.link_socket
        )

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
        incoming = IncomingStream(source, links.mailbox)
        broken = ""  # why the stream was refused midway
        try:
            for raw in request_iterator:
                incoming.feed(raw)
        except StreamError as error:
            broken = str(error)
        except grpc.RpcError:
            pass  # the call was cancelled: the peer died, or this server is stopping
        finally:
            # Clean only after a goodbye: when the peer's process dies, gRPC may end the stream as if the
            # peer had closed it before it reports the cancellation.
            links.incoming_ended(source, clean=incoming.clean and not broken, why=broken)
        if broken:
            context.abort(grpc.StatusCode.DATA_LOSS, broken)
        return comm_pb2.CommStreamSummary(messages=incoming.received)
