"""communicator.py: the Communicator's API, seen from ranks as threads of one process and as processes.

The collectives' algorithms are in test_collectives.py, start-up and lost peers in test_links.py, the token
and the rendezvous checks in test_server.py.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest
import torch
from comm_helpers import Cluster, assert_same_everywhere, on_every_rank, start_group

from meshllm.runtime.local_workers import free_ports
from meshllm.transport.comm import CommError, Communicator
from meshllm.transport.comm.communicator import ArrayKind
from meshllm.transport.comm.wire import Payload

# ---------------------------------------------------------------------------------------------------------
# Building a group


def test_arguments_are_checked_before_anything_starts() -> None:
    with pytest.raises(ValueError, match="rank 2 is outside"):
        Communicator(2, 2, ["127.0.0.1:1", "127.0.0.1:2"])
    with pytest.raises(ValueError, match="base_port"):
        Communicator(0, 2)
    with pytest.raises(ValueError, match="1 addresses for 2 ranks"):
        Communicator(0, 2, ["127.0.0.1:1"])
    with pytest.raises(ValueError, match="unknown framework"):
        Communicator(0, 1, ["127.0.0.1:1"], framework="jax")


# ---------------------------------------------------------------------------------------------------------
# Arrays and frameworks


def test_results_own_writable_data_without_a_copy_and_copy_read_only_data() -> None:
    owned = np.arange(6, dtype=np.float32)
    built = ArrayKind("numpy").build(Payload(owned, (2, 3), "float32"))
    assert np.shares_memory(built, owned) and built.shape == (2, 3)
    received = ArrayKind("numpy").build(Payload(owned.tobytes(), (6,), "float32"))
    assert received.flags.writeable
    as_torch = ArrayKind("torch").build(Payload(np.array([0x3F80, 0xC000], np.uint16), (2,), "bfloat16"))
    assert as_torch.dtype == torch.bfloat16 and as_torch.tolist() == [1.0, -2.0]


@pytest.mark.timeout(30)
def test_recv_returns_the_framework_asked_for(pair: list[Communicator]) -> None:
    first, second = pair
    for like, framework in [("torch", "torch"), (torch.zeros(1), "torch"), ("mlx", "mlx"), (None, "numpy")]:
        first.send(np.arange(4, dtype=np.float32), 1)
        got = second.recv(0, like=like)
        assert type(got).__module__.split(".")[0] == framework
        assert got.tolist() == [0.0, 1.0, 2.0, 3.0]


@pytest.mark.timeout(90)
def test_torch_tensors_come_back_as_torch_in_their_dtype(process_pair: Cluster) -> None:
    assert process_pair.run("torch_frameworks", timeout=80) == [True, True]


@pytest.mark.timeout(30)
def test_broadcast_checks_the_array_a_receiver_offers(pair: list[Communicator]) -> None:
    def share(comm: Communicator) -> Any:
        try:
            return comm.broadcast(
                np.arange(4, dtype=np.int64) if comm.rank == 0 else np.zeros(5, np.int64), 0
            )
        except CommError as error:
            return str(error)

    sent, refused = on_every_rank(pair, share)
    assert "the root sent int64 [4], this rank expected int64 [5]" in refused


# ---------------------------------------------------------------------------------------------------------
# Point to point


@pytest.mark.timeout(30)
def test_a_group_of_one_reduces_to_copies_of_its_input() -> None:
    with Communicator(0, 1, base_port=free_ports(1)[0]) as comm:
        values = np.arange(5, dtype=np.int64)
        for op in ["sum", "max", "min", "mean"]:
            result = comm.all_reduce(values, op=op)
            np.testing.assert_array_equal(result, values)
            assert not np.shares_memory(result, values)
        assert comm.broadcast(values, root=0) is values
        comm.barrier()
        comm.send(values, 0, tag=3)  # to itself
        np.testing.assert_array_equal(comm.recv(0, tag=3), values)


@pytest.mark.timeout(60)
def test_send_recv_around_a_ring(cluster: Cluster) -> None:
    assert cluster.run("ring_send_recv", rounds=5) == [5] * cluster.world_size


@pytest.mark.timeout(60)
def test_every_rank_sends_to_every_rank(cluster: Cluster) -> None:
    assert cluster.run("all_to_all") == [cluster.world_size] * cluster.world_size


@pytest.mark.timeout(60)
def test_recv_without_a_message_times_out_naming_the_peer_and_tag(cluster: Cluster) -> None:
    results = cluster.run("recv_times_out", source=1, tag=4242, seconds=0.3)
    error, elapsed = results[0]
    assert error.startswith("CommTimeoutError") and "rank 1" in error and "tag 4242" in error
    assert 0.3 <= elapsed < 3.0


@pytest.mark.timeout(60)
def test_ten_thousand_tagged_messages_arrive_complete_and_in_order(process_pair: Cluster) -> None:
    assert process_pair.run("tagged_stream", count=10_000, tags=7) == [10_000, 10_000]


@pytest.mark.timeout(60)
def test_large_arrays_travel_in_parts(process_pair: Cluster) -> None:
    digests = process_pair.run(
        "large", elements=(5 << 20) // 4 + 3
    )  # 5 MiB and a bit: several parts, ring path
    assert_same_everywhere(digests)


@pytest.mark.timeout(30)
def test_isend_completes_once_grpc_took_the_message(pair: list[Communicator]) -> None:
    first, second = pair
    done = first.isend(np.ones(1 << 20, dtype=np.float32), 1, tag=1)
    assert done.result(10) is None
    assert second.recv(0, tag=1).sum() == 1 << 20


@pytest.mark.timeout(30)
def test_an_input_changed_right_after_a_call_does_not_change_what_was_sent(pair: list[Communicator]) -> None:
    first, second = pair
    values = np.zeros(300_000, dtype=np.float32)  # larger than one part and than the ring threshold
    first.send(values, 1)
    values[:] = 7
    assert second.recv(0).sum() == 0

    def reduce_then_scribble(comm: Communicator) -> np.ndarray:
        mine = np.full(300_000, comm.rank + 1, dtype=np.float32)
        result = comm.all_reduce(mine)
        mine[:] = -100  # the other rank may still be reading what this rank sent
        return result

    for result in on_every_rank(pair, reduce_then_scribble):
        assert (result == 3).all() and result.flags.writeable


# ---------------------------------------------------------------------------------------------------------
# Closing


@pytest.mark.timeout(30)
def test_a_closed_peer_is_closed_not_lost_and_its_last_messages_arrive(pair: list[Communicator]) -> None:
    first, second = pair
    second.send(np.array([1, 2, 3], dtype=np.int32), 0, tag=9)
    second.close()
    np.testing.assert_array_equal(first.recv(1, tag=9), [1, 2, 3])
    started = time.monotonic()
    with pytest.raises(CommError, match="rank 1 .* closed its communicator") as closed:
        first.recv(1, tag=9)
    assert type(closed.value) is CommError and time.monotonic() - started < 2
    with pytest.raises(CommError, match="closed its communicator"):
        first.send(np.zeros(1, np.float32), 1)


@pytest.mark.timeout(30)
def test_calls_after_close_fail_at_once() -> None:
    (comm,) = start_group(1)
    comm.close()
    comm.close()  # twice is fine
    with pytest.raises(CommError, match="closed"):
        comm.recv(0)
    with pytest.raises(CommError, match="closed"):
        comm.send(np.zeros(1, np.float32), 0)
