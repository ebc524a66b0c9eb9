"""collectives.py: broadcast, all_reduce and barrier across ranks as processes (2, 4 and 8 of them),
and what happens when ranks do not call the same collective with the same arrays."""

from __future__ import annotations

import concurrent.futures

import numpy as np
import pytest
from comm_helpers import Cluster, assert_same_everywhere, on_every_rank

from meshllm.transport.comm import CommError, Communicator


@pytest.mark.timeout(60)
def test_broadcast_from_every_root(cluster: Cluster) -> None:
    for root in range(cluster.world_size):
        for dtype, shape in [("float32", [3, 5]), ("int64", [1001]), ("float32", [0]), ("int32", [])]:
            digests = cluster.run("broadcast", root=root, dtype=dtype, shape=shape)
            assert_same_everywhere(digests)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int64"])
@pytest.mark.parametrize("op", ["sum", "max", "min", "mean"])
def test_all_reduce_equals_numpy(cluster: Cluster, op: str, dtype: str) -> None:
    shapes = [
        [0],
        [],
        [1],
        [7],
        [3, 5],
        [1001],
        [17, 33],
    ]  # with ring_threshold=256 the last two use the ring
    for shape in shapes:
        assert_same_everywhere(cluster.run("all_reduce", op=op, dtype=dtype, shape=shape))


@pytest.mark.timeout(60)
def test_barrier_holds_every_rank_until_the_last_arrives(cluster: Cluster) -> None:
    times = cluster.run("barrier", delay=0.05)
    last_arrival = max(arrived for arrived, _ in times)
    assert all(left >= last_arrival for _, left in times), times


@pytest.mark.timeout(60)
def test_collectives_and_messages_do_not_mix(cluster: Cluster) -> None:
    assert cluster.run("interleaved") == [True] * cluster.world_size


@pytest.mark.timeout(30)
def test_ranks_in_different_collectives_are_told_so(pair: list[Communicator]) -> None:
    first, second = pair
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        rooted = pool.submit(second.broadcast, np.zeros(3, np.float32), 1)
        with pytest.raises(
            CommError, match="collective #0 is all_reduce on this rank but broadcast on rank 1"
        ):
            first.all_reduce(np.zeros(3, np.float32), timeout=5)
        rooted.result()


@pytest.mark.timeout(30)
def test_all_reduce_of_different_shapes_is_refused(pair: list[Communicator]) -> None:
    def reduce(comm: Communicator) -> str:
        try:
            comm.all_reduce(np.zeros(3 + comm.rank, np.float32), timeout=5)
        except CommError as error:
            return str(error)
        return "no error"

    for message in on_every_rank(pair, reduce):
        assert "every rank must pass the same shape and dtype" in message
