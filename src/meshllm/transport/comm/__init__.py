"""The communicator: point-to-point messages and collectives across N ranks.

    from meshllm.transport.comm import Communicator

    with Communicator(rank, world_size, base_port=50200, token=token) as comm:
        comm.send(hidden_states, dest=rank + 1, tag=step)
        total = comm.all_reduce(partial, op="sum")

The modules, from the API down (docs/communicator.md has the whole story):

- communicator.py: `Communicator`, the blocking API; the results in the caller's framework
- collectives.py: broadcast, all_reduce (direct and ring) and barrier on top of point-to-point messages
- reduce.py: the reduction arithmetic (working dtype, reduce ops)
- mailbox.py: where arrived messages wait for their receive; which peers are lost or closed
- links.py: this rank's gRPC server (the rendezvous), and its link or stream to every peer
- framed.py: the framed TCP/TLS links (transport/frames.py) that carry messages between ranks
- streams.py: a peer's messages over a gRPC `Exchange` stream, where the two ranks have no link
- outbox.py: the queue of messages for one peer, which its link or stream takes part by part
- server.py: the `Comm` service: the token check, `Hello`, and the reading of incoming gRPC streams
- incoming.py: one peer's incoming parts, from a link or a stream, joined into messages in the mailbox
- wire.py: payloads, and `CommMessage` parts written and read as bytes without extra copies
- errors.py: what the communicator raises

Arrays become wire bytes and back in tensors.py, the codec the stage service uses too.
"""

from meshllm.transport.comm.communicator import RING_THRESHOLD, Communicator
from meshllm.transport.comm.errors import CommAuthError, CommError, CommTimeoutError, PeerLostError
from meshllm.transport.comm.reduce import REDUCE_OPS
from meshllm.transport.tensors import FRAMEWORKS

__all__ = [
    "Communicator",
    "CommError",
    "CommTimeoutError",
    "PeerLostError",
    "CommAuthError",
    "REDUCE_OPS",
    "FRAMEWORKS",
    "RING_THRESHOLD",
]
