"""Groups of ranks for the communicator's tests (comm_helpers.py builds them)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from comm_helpers import Cluster, start_group

from meshllm.transport.comm import Communicator


@pytest.fixture
def pair() -> Iterator[list[Communicator]]:
    """Two ranks as threads of the test process."""
    comms = start_group(2)
    yield comms
    for comm in comms:
        comm.close()


@pytest.fixture(scope="session", params=[2, 4, 8], ids=lambda n: f"{n}ranks")
def cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """N rank processes, shared by every test that takes it (each world size starts once a session)."""
    started = Cluster(request.param, tmp_path_factory.mktemp(f"comm-{request.param}ranks"))
    yield started
    started.close()


@pytest.fixture(scope="session")
def process_pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Two rank processes whose all_reduce takes the ring beyond 64 KiB."""
    started = Cluster(2, tmp_path_factory.mktemp("comm-pair"), ring_threshold=64 << 10)
    yield started
    started.close()
