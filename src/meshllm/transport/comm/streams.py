"""This rank's messages to a peer over a gRPC `Exchange` stream: the path where the two ranks have no
framed link between them (`MESHLLM_LINKS=0`, a peer without links, a link that could not be opened).

gRPC's sending thread takes the peer's `Outbox` (outbox.py), the stream's request iterator, one part at a
time, in order; the peer's server (server.py) reads the stream into its mailbox. The stream ending tells
whether the peer took everything (its `CommStreamSummary`) or is gone.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import grpc

from meshllm.transport.comm.errors import CommError
from meshllm.transport.comm.framed import lose_peer
from meshllm.transport.comm.outbox import Outbox, OutgoingMessage
from meshllm.transport.comm.wire import RANK_KEY, SERVICE
from meshllm.transport.proto import comm_pb2

if TYPE_CHECKING:
    from meshllm.transport.comm.links import Links

log = logging.getLogger(__name__)


def describe_rpc_error(error: BaseException) -> str:
    if isinstance(error, grpc.RpcError) and hasattr(error, "code"):
        return f"{error.code().name}: {error.details()}"
    return f"{type(error).__name__}: {error}"


class StreamSender:
    """This rank's messages to one peer over a gRPC `Exchange` stream: gRPC's sending thread takes them
    from the peer's outbox part by part."""

    def __init__(self, links: Links, peer: int, channel: grpc.Channel) -> None:
        self.links = links
        self.peer = peer
        self.outbox = Outbox(links.rank)
        metadata = (*links.metadata, (RANK_KEY, str(links.rank)))
        # Parts are bytes already (wire.py), so no serializer: gRPC sends them as they are.
        exchange = channel.stream_unary(
            f"/{SERVICE}/Exchange",
            request_serializer=None,
            response_deserializer=comm_pb2.CommStreamSummary.FromString,
        )
        self.stream = exchange.future(self.outbox, metadata=metadata)
        self.stream.add_done_callback(self._ended)

    def submit(self, message: OutgoingMessage, timeout: float) -> bool:
        return self.outbox.put(message, timeout)

    def end(self) -> None:
        """End the stream after what is queued, with a goodbye."""
        self.outbox.end()

    def finish(self, timeout: float) -> bool:
        """Wait up to `timeout` for the stream to end; else cancel it. True when it ended in time."""
        try:
            self.stream.result(timeout)
        except grpc.FutureTimeoutError:
            self.stream.cancel()
            return False
        except Exception as error:
            log.debug(
                "rank %d: the stream to rank %d ended: %s",
                self.links.rank,
                self.peer,
                describe_rpc_error(error),
            )
        return True

    def close(self) -> None:
        pass  # the channel is closed with the others

    def _ended(self, call: grpc.Future) -> None:
        """gRPC's callback when this rank's stream to the peer ended: cleanly after `close`, or broken."""
        links, peer, outbox = self.links, self.peer, self.outbox
        error = call.exception() if not call.cancelled() else None
        if error is None and not call.cancelled():
            summary = call.result()
            if summary.messages != outbox.messages:
                log.warning(
                    "rank %d: rank %d took %d of %d messages",
                    links.rank,
                    peer,
                    summary.messages,
                    outbox.messages,
                )
            outbox.fail(lambda: CommError(f"rank {links.rank}: the stream to rank {peer} is closed"))
            return
        detail = describe_rpc_error(error) if error else "cancelled"
        reason = f"the stream to it broke ({detail}): the process died, or the network failed"
        lose_peer(links, peer, reason, outbox)
