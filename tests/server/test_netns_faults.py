"""Network faults for real: a 3-stage cluster across three network namespaces this test makes (each stage
in its own, linked by veth pairs with `tc netem` on both ends), reached through a fourth, clean link.

Needs root, `ip` (iproute2) and the kernel's netem; skipped, saying which is missing, otherwise."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from server_helpers import wait_until
from test_serve_cli import Serve, free_port

from meshllm.cluster import certs

NETEM = "delay 5ms loss 1%"
MAX_TOKENS = 20
BODIES = [
    {
        "messages": [{"role": "user", "content": f"Say something, number {i}."}],
        "max_tokens": MAX_TOKENS,
        "ignore_eos": True,
        "stream": True,
        **({"temperature": 0.0} if i < 2 else {"temperature": 1.0, "seed": 70 + i}),
    }
    for i in range(4)
]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


def _why_not() -> str:
    if sys.platform != "linux":
        return "network namespaces are Linux only"
    if os.geteuid() != 0:
        return "needs root to make network namespaces (ip netns)"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "needs iproute2 (ip and tc)"
    return ""


class Cluster:
    """Namespaces n0 (the coordinator), n1 and n2 (the workers). Each has its own address on its loopback
    device; each pair is linked by a veth pair with netem on both ends; the test reaches n0's API over a
    link without netem. Everything goes when the namespaces are deleted."""

    def __init__(self) -> None:
        tag = f"ml{os.getpid() % 1000:03d}{random.randrange(100):02d}"
        net = random.randrange(256)
        self.namespaces = [f"{tag}n{i}" for i in range(3)]
        self.own = [f"198.18.{net}.{i + 1}" for i in range(3)]
        self.client_side, self.api_host = f"198.19.{net}.1", f"198.19.{net}.2"
        self.links: dict[tuple[int, int], tuple[str, str]] = {}
        self.processes: list[subprocess.Popen[str]] = []
        self.logs: list[Path] = []
        self.has_netem = True  # False on a kernel without sch_netem: the links are clean then
        self._tag = tag
        self.tls_dir = Path(tempfile.mkdtemp(prefix="meshllm-netns-tls-"))
        self._make_certificates()  # the links leave loopback: mutual TLS, as a real cluster's do
        try:
            self._make()
        except subprocess.CalledProcessError as error:
            self.close()
            pytest.skip(f"cannot make network namespaces here: {' '.join(error.cmd)}: {error.stderr.strip()}")

    def _make_certificates(self) -> None:
        """A cluster CA and, per namespace, a certificate naming its own address (keys 0600)."""
        ca = certs.make_ca("netns")
        certs.write_private(self.tls_dir / "ca.pem", ca.cert)
        for index, own in enumerate(self.own):
            issued = certs.make_device_cert(ca, f"n{index}", [own])
            certs.write_private(self.tls_dir / f"n{index}.pem", issued.cert)
            certs.write_private(self.tls_dir / f"n{index}.key", issued.key)

    def tls_flags(self, index: int) -> list[str]:
        folder = self.tls_dir
        return ["--tls-ca", str(folder / "ca.pem"), "--tls-cert", str(folder / f"n{index}.pem"),
                "--tls-key", str(folder / f"n{index}.key")]  # fmt: skip

    def _make(self) -> None:
        for ns, own in zip(self.namespaces, self.own, strict=True):
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "addr", "add", f"{own}/32", "dev", "lo")
        for i, j in [(0, 1), (1, 2), (0, 2)]:
            a, b = f"{self._tag}{i}{j}a", f"{self._tag}{i}{j}b"
            _ip("link", "add", a, "type", "veth", "peer", "name", b)
            _ip("link", "set", a, "netns", self.namespaces[i])
            _ip("link", "set", b, "netns", self.namespaces[j])
            for ns, dev, peer, src in [
                (self.namespaces[i], a, self.own[j], self.own[i]),
                (self.namespaces[j], b, self.own[i], self.own[j]),
            ]:
                _ip("-n", ns, "link", "set", dev, "up")
                _ip("-n", ns, "route", "add", f"{peer}/32", "dev", dev, "src", src)
            self.links[(i, j)] = (a, b)
            if self.has_netem:
                self.has_netem = self._try_netem((i, j))
        client, inside = f"{self._tag}ca", f"{self._tag}cb"
        _ip("link", "add", client, "type", "veth", "peer", "name", inside)
        _ip("link", "set", inside, "netns", self.namespaces[0])
        _ip("addr", "add", f"{self.client_side}/30", "dev", client)
        _ip("link", "set", client, "up")
        _ip("-n", self.namespaces[0], "addr", "add", f"{self.api_host}/30", "dev", inside)
        _ip("-n", self.namespaces[0], "link", "set", inside, "up")

    def netem(self, link: tuple[int, int], spec: str) -> None:
        """Both ends of `link` (namespace indices) egress through netem with `spec`."""
        for index, dev in zip(link, self.links[link], strict=True):
            subprocess.run(
                ["ip", "netns", "exec", self.namespaces[index], "tc", "qdisc", "replace", "dev", dev, "root",
                 "netem", *spec.split()],
                check=True, capture_output=True, text=True, timeout=30,
            )  # fmt: skip

    def _try_netem(self, link: tuple[int, int]) -> bool:
        try:
            self.netem(link, NETEM)
        except subprocess.CalledProcessError as error:
            if "unknown" not in error.stderr:
                raise
            return False
        return True

    def cut(self, link: tuple[int, int]) -> None:
        """Packets stop both ways, silently on the near end: its device loses its carrier and drops what
        it is given, while the far end's own device is down (no route: its sends fail locally)."""
        i, j = link
        _ip("-n", self.namespaces[j], "link", "set", self.links[link][1], "down")

    def mend(self, link: tuple[int, int]) -> None:
        i, j = link
        ns, dev = self.namespaces[j], self.links[link][1]
        _ip("-n", ns, "link", "set", dev, "up")
        _ip("-n", ns, "route", "replace", f"{self.own[i]}/32", "dev", dev, "src", self.own[j])

    def start_worker(self, index: int, name: str, port: int) -> str:
        """A worker in namespace `index`, bound to that namespace's own address; returns its address."""
        log = Path(tempfile.mkstemp(prefix=f"meshllm-{name}-", suffix=".log")[1])
        self.logs.append(log)
        with open(log, "w") as output:
            process = subprocess.Popen(
                ["ip", "netns", "exec", self.namespaces[index], sys.executable, "-m", "meshllm", "worker",
                 "--host", self.own[index], "--port", str(port), "--name", name, "--threads", "1",
                 *self.tls_flags(index)],
                stdout=output, stderr=subprocess.STDOUT, text=True,
            )  # fmt: skip
        self.processes.append(process)
        assert wait_until(lambda: "listening on" in log.read_text() or process.poll() is not None, 60)
        assert process.poll() is None, log.read_text()
        return f"{self.own[index]}:{port}"

    def serve(self, *args: str) -> Serve:
        """`meshllm serve` in namespace 0, its API on the clean link."""
        serve = Serve.__new__(Serve)
        serve.process = subprocess.Popen(
            # The workers read the checkpoint themselves: each namespace reaches only its neighbours
            # in the chain, not the coordinator's weights port.
            ["ip", "netns", "exec", self.namespaces[0], sys.executable, "-m", "meshllm", "serve",
             "--host", self.api_host, "--weights", "own", *self.tls_flags(0), *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        serve.lines = []
        serve._reader = threading.Thread(target=serve._read, daemon=True)
        serve._reader.start()
        return serve

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
            process.wait(timeout=10)
        for log in self.logs:
            log.unlink(missing_ok=True)
        for ns in self.namespaces:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        shutil.rmtree(self.tls_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[Cluster, str]]:
    why = _why_not()
    if why:
        pytest.skip(why)
    made = Cluster()
    try:
        port = free_port()
        workers = (
            f"worker1={made.start_worker(1, 'worker1', port)},worker2={made.start_worker(2, 'worker2', port)}"
        )
        yield made, workers
    finally:
        made.close()


def wait_ready(serve: Serve, host: str) -> str:
    ready = re.compile(rf"API ready at (http://{re.escape(host)}:\d+)/v1")
    assert wait_until(lambda: ready.search(serve.output) or serve.process.poll() is not None, 120), (
        serve.output
    )
    match = ready.search(serve.output)
    assert match, serve.output
    return match.group(1)


Reply = tuple[str, str, float, str]  # text, finish reason, longest wait between two tokens, error


def stream(url: str, bodies: list[dict], on_token: Callable[[int, int], None] | None = None) -> list[Reply]:
    replies: list[Reply] = [("", "", 0.0, "")] * len(bodies)

    def one(index: int) -> None:
        pieces, finish, error, longest = [], "", "", 0.0
        last = time.monotonic()
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=bodies[index], timeout=120) as reply:
            for line in reply.iter_lines():
                if not line.startswith("data: {"):
                    continue
                event = json.loads(line[len("data: ") :])
                now = time.monotonic()
                longest, last = max(longest, now - last), now
                if "error" in event:
                    error = event["error"]["message"]
                    break
                choice = event["choices"][0]
                pieces.append(choice["delta"].get("content") or "")
                finish = choice["finish_reason"] or finish
                if on_token is not None:
                    on_token(index, len(pieces))
        replies[index] = ("".join(pieces), finish, longest, error)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(bodies))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    return replies


def texts(replies: list[Reply]) -> list[tuple[str, str, str]]:
    return [(text, finish, error) for text, finish, _, error in replies]


@pytest.fixture(scope="module")
def expected(tiny_checkpoint: Callable[..., Path]) -> list[tuple[str, str, str]]:
    """The replies of an undisturbed cluster on loopback."""
    loopback = Serve(
        "--model", str(tiny_checkpoint(arch="qwen3", layers=4)), "--stages", "3", "--port", str(free_port())
    )
    try:
        replies = texts(stream(wait_ready(loopback, "127.0.0.1"), BODIES))
        assert all(finish == "length" and not error for _, finish, error in replies), replies
        assert loopback.stop(signal.SIGINT) == 0, loopback.output
        return replies
    finally:
        loopback.kill()


def test_netem_links_give_the_loopback_tokens(
    tiny_checkpoint: Callable[..., Path], cluster: tuple[Cluster, str], expected: list[tuple[str, str, str]]
) -> None:
    made, workers = cluster
    if not made.has_netem:
        pytest.skip("the kernel has no netem qdisc (sch_netem): links cannot be given delay and loss")
    serve = made.serve("--model", str(tiny_checkpoint(arch="qwen3", layers=4)), "--workers", workers,
                       "--port", "8000")  # fmt: skip
    try:
        assert texts(stream(wait_ready(serve, made.api_host), BODIES)) == expected  # 5 ms, 1% loss each link
        assert serve.stop(signal.SIGINT) == 0, serve.output
    finally:
        serve.kill()


def test_a_3_s_cut_of_a_link_pauses_the_streams_and_they_go_on_with_the_same_tokens(
    tiny_checkpoint: Callable[..., Path], cluster: tuple[Cluster, str], expected: list[tuple[str, str, str]]
) -> None:
    made, workers = cluster
    serve = made.serve("--model", str(tiny_checkpoint(arch="qwen3", layers=4)), "--workers", workers,
                       "--port", "8000", "--replan-after", "0")  # fmt: skip
    cut_once = threading.Event()

    def cut_for_3_s(index: int, produced: int) -> None:
        if index == 0 and produced == MAX_TOKENS // 2 and not cut_once.is_set():
            cut_once.set()
            made.cut((0, 1))  # the coordinator's link to the middle worker
            threading.Timer(3.0, made.mend, args=((0, 1),)).start()

    try:
        replies = stream(wait_ready(serve, made.api_host), BODIES, cut_for_3_s)
        assert cut_once.is_set()
        assert texts(replies) == expected, serve.output
        assert replies[0][2] >= 2.5  # the streams paused for the cut, then went on
        assert serve.stop(signal.SIGINT) == 0, serve.output
    finally:
        serve.kill()


def test_a_cut_longer_than_the_replay_timeout_ends_the_streams_with_an_error_naming_the_link(
    tiny_checkpoint: Callable[..., Path], cluster: tuple[Cluster, str]
) -> None:
    made, workers = cluster
    checkpoint = str(tiny_checkpoint(arch="qwen3", layers=4))
    serve = made.serve(
        "--model", checkpoint, "--workers", workers, "--port", "8000",
        "--step-timeout", "1", "--replay-timeout", "3", "--replan-after", "0",
    )  # fmt: skip
    long_bodies = [{**body, "max_tokens": 400} for body in BODIES[:2]]
    cut_at: list[float] = []
    try:
        url = wait_ready(serve, made.api_host)

        def cut_for_good(index: int, produced: int) -> None:
            if index == 0 and produced == 5 and not cut_at:
                cut_at.append(time.monotonic())
                made.cut((0, 1))

        replies = stream(url, long_bodies, cut_for_good)
        ended = time.monotonic()
        assert cut_at
        middle = made.own[1]
        for *_, error in replies:
            assert error and "worker1" in error and middle in error, replies
            assert "not whole again within 3 s" in error
        assert ended - cut_at[0] <= 3 + 2, ended - cut_at[0]
    finally:
        made.mend((0, 1))
        serve.kill()
