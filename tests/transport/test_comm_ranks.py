"""The communicator across real processes: one OS process per rank, real gRPC on 127.0.0.1.

The tests start a `Cluster`: N processes that each run comm_rank_worker.py, build a Communicator,
and then run named scenarios on request (one JSON line on stdin per request, one JSON line back on
stdout). A cluster serves many tests, so each world size pays its start-up once. Every scenario checks
its own results on its rank (see the worker), and returns what the test compares across ranks.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from meshllm.transport.comm_bench import free_ports

WORKER = Path(__file__).with_name("comm_rank_worker.py")


class RankFailed(AssertionError):
    pass


class Cluster:
    """`world_size` rank processes on 127.0.0.1, each waiting for scenarios to run."""

    def __init__(
        self,
        world_size: int,
        logs: Path,
        *,
        timeout: float = 20.0,
        ring_threshold: int = 256,
        tokens: list[str | None] | None = None,
        wait_ready: bool = True,
    ) -> None:
        self.world_size = world_size
        self.addresses = [f"127.0.0.1:{port}" for port in free_ports(world_size)]
        self.logs = logs  # each rank's stderr, shown when it fails
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.processes: list[subprocess.Popen[str]] = []
        self.replies: list[queue.Queue[dict[str, Any]]] = []
        for rank in range(world_size):
            command = [
                sys.executable, str(WORKER), "--rank", str(rank), "--addresses", ",".join(self.addresses),
                "--timeout", str(timeout), "--ring-threshold", str(ring_threshold),
            ]  # fmt: skip
            token = tokens[rank] if tokens else None
            if token:
                command += ["--token", token]
            stderr = open(self.logs / f"rank{rank}.log", "w")  # noqa: SIM115 (the process owns it)
            process = subprocess.Popen(
                command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env
            )
            stderr.close()
            replies: queue.Queue[dict[str, Any]] = queue.Queue()
            threading.Thread(target=self._read, args=(process, replies), daemon=True).start()
            self.processes.append(process)
            self.replies.append(replies)
        if wait_ready:
            for rank, ready in enumerate(self.collect(range(world_size), timeout + 30)):
                if not ready.get("ok"):
                    self.close()
                    raise RankFailed(
                        f"rank {rank} did not start: {ready.get('error')}\n{self.log_tail(rank)}"
                    )

    @staticmethod
    def _read(process: subprocess.Popen[str], replies: queue.Queue[dict[str, Any]]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            if line.startswith("{"):
                replies.put(json.loads(line))
        replies.put({"ok": False, "error": f"the process exited (code {process.wait()})", "exited": True})

    def log_tail(self, rank: int) -> str:
        text = (self.logs / f"rank{rank}.log").read_text(errors="replace")
        return text[-2000:]

    def start(self, scenario: str, ranks: list[int] | None = None, **kwargs: Any) -> None:
        """Ask `ranks` (default: all) to run `scenario(comm, **kwargs)`; replies are read by `collect`."""
        line = json.dumps({"scenario": scenario, "args": kwargs}) + "\n"
        for rank in range(self.world_size) if ranks is None else ranks:
            stdin = self.processes[rank].stdin
            assert stdin is not None
            stdin.write(line)
            stdin.flush()

    def collect(self, ranks: Any, timeout: float) -> list[dict[str, Any]]:
        """The next reply of each of `ranks`, waiting up to `timeout` seconds in all."""
        deadline = time.monotonic() + timeout
        replies = []
        for rank in ranks:
            try:
                replies.append(self.replies[rank].get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                raise RankFailed(
                    f"rank {rank} gave no reply within {timeout} s\n{self.log_tail(rank)}"
                ) from None
        return replies

    def run(self, scenario: str, timeout: float = 60.0, **kwargs: Any) -> list[Any]:
        """Run `scenario` on every rank; the results by rank, or RankFailed with every rank's error."""
        self.start(scenario, **kwargs)
        replies = self.collect(range(self.world_size), timeout)
        errors = [f"rank {rank}: {reply['error']}" for rank, reply in enumerate(replies) if not reply["ok"]]
        if errors:
            raise RankFailed(f"{scenario}({kwargs}) failed:\n" + "\n".join(errors))
        return [reply["result"] for reply in replies]

    def kill(self, rank: int) -> None:
        os.kill(self.processes[rank].pid, signal.SIGKILL)
        self.processes[rank].wait()

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None and process.stdin is not None:
                try:
                    process.stdin.close()  # the rank closes its communicator and exits
                except OSError:
                    pass
        deadline = time.monotonic() + 10
        for process in self.processes:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture(scope="module", params=[2, 4, 8], ids=lambda n: f"{n}ranks")
def cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    started = Cluster(request.param, tmp_path_factory.mktemp(f"comm-{request.param}ranks"))
    yield started
    started.close()


def assert_same_everywhere(digests: list[Any]) -> None:
    assert all(digest == digests[0] for digest in digests), f"ranks disagree: {digests}"


# ---------------------------------------------------------------------------------------------------------
# Point to point.


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


# ---------------------------------------------------------------------------------------------------------
# Collectives.


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


# ---------------------------------------------------------------------------------------------------------
# Two ranks: volume, frameworks.


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Any:
    started = Cluster(2, tmp_path_factory.mktemp("comm-pair"), ring_threshold=64 << 10)
    yield started
    started.close()


@pytest.mark.timeout(60)
def test_ten_thousand_tagged_messages_arrive_complete_and_in_order(pair: Cluster) -> None:
    assert pair.run("tagged_stream", count=10_000, tags=7) == [10_000, 10_000]


@pytest.mark.timeout(60)
def test_large_arrays_travel_in_parts(pair: Cluster) -> None:
    digests = pair.run("large", elements=(5 << 20) // 4 + 3)  # 5 MiB and a bit: several parts, ring path
    assert_same_everywhere(digests)


@pytest.mark.timeout(90)
def test_torch_tensors_come_back_as_torch_in_their_dtype(pair: Cluster) -> None:
    assert pair.run("torch_frameworks", timeout=80) == [True, True]


# ---------------------------------------------------------------------------------------------------------
# Failures.


@pytest.mark.timeout(60)
def test_a_killed_rank_fails_the_others_collective_naming_it(tmp_path: Path) -> None:
    timeout = 15.0
    doomed = 2
    cluster = Cluster(4, tmp_path, timeout=timeout, ring_threshold=1024)
    try:
        cluster.start("all_reduce_until_failure", elements=1 << 18)
        time.sleep(1.0)
        killed_at = time.monotonic()
        cluster.kill(doomed)
        survivors = [0, 1, 3]
        replies = cluster.collect(survivors, timeout + 5)
        elapsed = time.monotonic() - killed_at
    finally:
        cluster.close()
    for rank, reply in zip(survivors, replies, strict=True):
        assert not reply["ok"], f"rank {rank} did not notice: {reply}"
        assert reply["error"].startswith("PeerLostError"), reply["error"]
        assert f"rank {doomed} " in reply["error"], reply["error"]
    assert elapsed < timeout


@pytest.mark.timeout(60)
def test_a_receive_from_a_killed_rank_fails_at_once_naming_it(tmp_path: Path) -> None:
    timeout = 15.0
    cluster = Cluster(2, tmp_path, timeout=timeout)
    try:
        cluster.start("recv_once", ranks=[0], source=1, tag=3)
        time.sleep(0.5)
        killed_at = time.monotonic()
        cluster.kill(1)
        (reply,) = cluster.collect([0], timeout + 5)
        elapsed = time.monotonic() - killed_at
    finally:
        cluster.close()
    assert not reply["ok"] and reply["error"].startswith("PeerLostError"), reply
    assert "recv with tag 3" in reply["error"] and "rank 1 " in reply["error"], reply["error"]
    assert elapsed < timeout / 2


@pytest.mark.timeout(60)
def test_a_rank_without_the_token_is_refused(tmp_path: Path) -> None:
    cluster = Cluster(2, tmp_path, tokens=["sesame", None], timeout=10.0, wait_ready=False)
    try:
        refused = cluster.collect([1], 40)[0]
    finally:
        cluster.kill(0)
        cluster.close()
    assert not refused["ok"]
    assert refused["error"].startswith("CommAuthError"), refused["error"]
    assert "rank 0" in refused["error"] and "token" in refused["error"]
