"""Groups of ranks for the communicator's tests (comm_helpers.py builds them)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from comm_helpers import Cluster, start_group

from meshllm.transport.comm import Communicator
from meshllm.transport.frames import LINKS_ENV


@pytest.fixture(params=["links", "grpc"])
def transport(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Ranks as threads of the test process send over framed links, or (`MESHLLM_LINKS=0`) over gRPC."""
    monkeypatch.setenv(LINKS_ENV, "1" if request.param == "links" else "0")
    return str(request.param)


@pytest.fixture
def pair(transport: str) -> Iterator[list[Communicator]]:
    """Two ranks as threads of the test process, over links and over gRPC."""
    comms = start_group(2)
    yield comms
    for comm in comms:
        comm.close()


# (world size, which ranks take links): every rank, none (MESHLLM_LINKS=0), or all but rank 1, whose
# peers then send to it over gRPC while it sends to them over gRPC too.
CLUSTERS = {
    "2ranks": (2, [True] * 2),
    "4ranks": (4, [True] * 4),
    "8ranks": (8, [True] * 8),
    "4ranks-grpc": (4, [False] * 4),
    "3ranks-mixed": (3, [True, False, True]),
}


@pytest.fixture(scope="session", params=list(CLUSTERS))
def cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """N rank processes, shared by every test that takes it (each kind starts once a session)."""
    world_size, links = CLUSTERS[request.param]
    started = Cluster(world_size, tmp_path_factory.mktemp(f"comm-{request.param}"), links=links)
    yield started
    started.close()


@pytest.fixture(scope="session", params=["links", "grpc"])
def process_pair(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    """Two rank processes whose all_reduce takes the ring beyond 64 KiB, over links and over gRPC."""
    links = [request.param == "links"] * 2
    folder = tmp_path_factory.mktemp(f"comm-pair-{request.param}")
    started = Cluster(2, folder, ring_threshold=64 << 10, links=links)
    yield started
    started.close()
