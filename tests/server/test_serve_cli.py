"""`meshllm serve` as a real subprocess: starts, answers, and stops cleanly with nothing left behind."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from server_helpers import wait_until

from meshllm.cli.serve import _print_banner
from meshllm.runtime.local_workers import LocalWorkers

READY = re.compile(r"API ready at (http://127\.0\.0\.1:\d+)/v1  \(Ctrl-C stops everything\)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pid_exists(pid: int) -> bool:
    """Whether the process runs (a zombie, dead but not yet reaped by whoever adopted it, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:  # no /proc (not Linux), or it just went
        return True


class Serve:
    """A `meshllm serve` process whose output is collected line by line."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        if "--workers" in args and "--weights-port" not in args:
            # The default, the API's port + 1, was not checked free: a worker's step link may hold it.
            args = (*args, "--weights-port", str(free_port()))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "meshllm", "serve", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_ready(self, timeout: float = 120.0) -> str:
        assert wait_until(lambda: READY.search(self.output) or self.process.poll() is not None, timeout), (
            self.output
        )
        match = READY.search(self.output)
        assert match, self.output
        return match.group(1)

    def worker_pids(self) -> list[int]:
        return [int(pid) for pid in re.findall(r"started worker\d+ on \S+ \(pid (\d+)", self.output)]

    def stop(self, signum: int) -> int:
        self.process.send_signal(signum)
        try:
            return self.process.wait(timeout=30)
        finally:
            self._reader.join(timeout=5)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        for pid in self.worker_pids():
            if pid_exists(pid):
                os.kill(pid, signal.SIGKILL)


def test_serve_answers_a_chat_request_and_stops_cleanly_on_ctrl_c(
    tiny_checkpoint: Callable[..., Path],
) -> None:
    checkpoint = tiny_checkpoint(arch="qwen3", layers=4)
    port = free_port()
    serve = Serve("--model", str(checkpoint), "--stages", "2", "--port", str(port))
    try:
        url = serve.wait_ready()
        assert url == f"http://127.0.0.1:{port}"
        assert (
            "plan: stage 0 layers [0, 2) on this process · stage 1 layers [2, 4) on worker1" in serve.output
        )
        [worker_pid] = serve.worker_pids()
        # A step alone in the pipeline may take every core: the worker's share is --threads.
        command = Path(f"/proc/{worker_pid}/cmdline").read_bytes().split(b"\0")
        cores = len(os.sched_getaffinity(0))
        if cores > 1:
            assert command[command.index(b"--threads-alone") + 1] == str(cores).encode(), command
            # and its idle OpenMP threads give the cores back soon (unless the environment said otherwise)
            environ = Path(f"/proc/{worker_pid}/environ").read_bytes().split(b"\0")
            if "GOMP_SPINCOUNT" not in os.environ:
                assert b"GOMP_SPINCOUNT=10000" in environ
        reply = httpx.post(
            f"{url}/v1/chat/completions",
            json={
                "model": checkpoint.name,
                "messages": [{"role": "user", "content": "Hello!"}],
                "max_tokens": 5,
            },
            timeout=30,
        )
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] >= 1
        assert serve.stop(signal.SIGINT) == 0, serve.output
        assert not pid_exists(worker_pid), "the local worker must stop with serve"
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))  # the API port is free again
    finally:
        serve.kill()


def test_a_local_worker_that_dies_is_started_again_and_serves_again(
    tiny_checkpoint: Callable[..., Path],
) -> None:
    checkpoint = tiny_checkpoint(arch="qwen3", layers=4)
    serve = Serve("--model", str(checkpoint), "--stages", "2", "--port", str(free_port()))
    try:
        url = serve.wait_ready()
        [worker_pid] = serve.worker_pids()
        os.kill(worker_pid, signal.SIGKILL)

        def down_message() -> str:
            reply = httpx.get(f"{url}/health", timeout=5)
            return reply.json()["message"] if reply.status_code == 503 else ""

        # The monitor sees the worker gone, and serve's supervisor how it exited: both show in /health.
        assert wait_until(
            lambda: "worker1" in down_message() and "exited with signal SIGKILL" in down_message(), 10
        )
        assert wait_until(lambda: httpx.get(f"{url}/health", timeout=5).status_code == 200, 90), serve.output
        assert "started worker1 again" in serve.output
        reply = httpx.post(
            f"{url}/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 5},
            timeout=30,
        )
        assert reply.status_code == 200, reply.text
        assert serve.stop(signal.SIGINT) == 0, serve.output
    finally:
        serve.kill()


def test_a_stream_survives_its_worker_being_killed_with_the_same_reply(
    tiny_checkpoint: Callable[..., Path],
) -> None:
    checkpoint = tiny_checkpoint(arch="qwen3", layers=4)
    serve = Serve("--model", str(checkpoint), "--stages", "2", "--port", str(free_port()))
    body = {
        "messages": [{"role": "user", "content": "Tell me a story."}],
        "max_tokens": 60,
        "ignore_eos": True,
        "temperature": 1.0,
        "seed": 11,
        "stream": True,
    }
    try:
        url = serve.wait_ready()
        [worker_pid] = serve.worker_pids()

        def streamed(kill_after: int | None) -> tuple[str, str]:
            pieces, finish = [], ""
            with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as reply:
                for line in reply.iter_lines():
                    if not line.startswith("data: {"):
                        continue
                    event = json.loads(line[len("data: ") :])
                    assert "error" not in event, event
                    choice = event["choices"][0]
                    pieces.append(choice["delta"].get("content") or "")
                    finish = choice["finish_reason"] or finish
                    if kill_after is not None and len(pieces) == kill_after:
                        os.kill(worker_pid, signal.SIGKILL)  # serve starts it again; the stream waits
            return "".join(pieces), finish

        expected, _ = streamed(None)
        text, finish = streamed(kill_after=10)
        assert "exited with signal SIGKILL" in serve.output and "started worker1 again" in serve.output
        assert (text, finish) == (expected, "length")
        assert serve.stop(signal.SIGINT) == 0, serve.output
    finally:
        serve.kill()


def test_serve_with_given_workers_stops_on_sigterm_and_leaves_them_running(
    tiny_checkpoint: Callable[..., Path],
) -> None:
    checkpoint = tiny_checkpoint(arch="qwen3", layers=4)
    workers = LocalWorkers()
    [address] = workers.spawn(1, token="cli-token", threads=1)
    serve = None
    try:
        serve = Serve(
            "--model", str(checkpoint), "--workers", f"remote1={address.address}", "--token", "cli-token",
            "--port", str(free_port()), "--api-key", "k", "--served-model-name", "tiny-served",
        )  # fmt: skip
        url = serve.wait_ready()
        assert "on remote1 127.0.0.1:" in serve.output
        assert serve.worker_pids() == []  # it started none of its own
        headers = {"Authorization": "Bearer k"}
        models = httpx.get(f"{url}/v1/models", headers=headers, timeout=10).json()
        assert [card["id"] for card in models["data"]] == ["tiny-served"]
        assert httpx.get(f"{url}/v1/models", timeout=10).status_code == 401
        assert serve.stop(signal.SIGTERM) == 0, serve.output
        assert workers.workers[0].process.poll() is None, (
            "a worker serve did not start is not serve's to stop"
        )
    finally:
        if serve is not None:
            serve.kill()
        workers.stop()


def test_a_busy_port_is_reported_before_anything_starts() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "meshllm", "serve", "--model", "demo", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1
    assert f"127.0.0.1:{port}" in result.stderr and "--port" in result.stderr
    assert "started worker" not in result.stderr


def test_demo_model_is_announced_as_noise(capsys: pytest.CaptureFixture[str]) -> None:
    _print_banner("demo")
    assert "random weights" in capsys.readouterr().out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux only")
def test_local_workers_die_even_when_serve_is_killed(tiny_checkpoint: Callable[..., Path]) -> None:
    serve = Serve(
        "--model", str(tiny_checkpoint(arch="qwen3", layers=4)), "--stages", "3", "--port", str(free_port())
    )
    try:
        serve.wait_ready()
        assert "stage 2 layers" in serve.output
        worker_pids = serve.worker_pids()
        assert len(worker_pids) == 2 and all(pid_exists(pid) for pid in worker_pids)
        serve.process.kill()  # SIGKILL: serve cannot clean up; the kernel signals its children
        serve.process.wait()
        assert wait_until(lambda: not any(pid_exists(pid) for pid in worker_pids), timeout=10)
    finally:
        serve.kill()


def test_serve_measures_the_devices_and_links_and_predicts_its_speed(
    tiny_checkpoint: Callable[..., Path],
) -> None:
    checkpoint = tiny_checkpoint(arch="qwen3", layers=4)
    serve = Serve(
        "--model", str(checkpoint), "--stages", "3", "--port", str(free_port()), env={"MESHLLM_PREDICT": "1"}
    )
    try:
        serve.wait_ready(timeout=240.0)
    finally:
        serve.stop(signal.SIGTERM)
    output = serve.output
    assert re.search(
        r"device speeds: coordinator reads [\d.]+ GB/s(?: \([\d.]+ alone\))?, computes \d+ GFLOP/s "
        r"\(\d+ decoding\), a layer adds [\d.]+ ms a decode token \((?:[\d.]+ alone, )?[\d.]+ a prompt token, [\d.]+ a one-token step\), worker1 reads",
        output,
    ), output
    assert re.search(r"link coordinator -> worker1: [\d.]+ ms round trip, \d+ MB/s", output), output
    assert re.search(r"link worker1 -> worker2: [\d.]+ ms round trip", output), output
    found = re.search(
        r"predicted decode: ([\d.]+) tok/s for one stream, ([\d.]+) tok/s total for 16 streams", output
    )
    assert found and 0 < float(found.group(1)) < float(found.group(2)), output
    assert re.search(r"; (coordinator|worker\d) alone: [\d.]+ and [\d.]+ tok/s", output), output
    # Its three stages share this machine's cores: the start says how they serve many streams.
    assert re.search(
        r"stages on the same cores: (taking turns, one step at a time|computing at once, a micro-batch "
        r"each) \([\d.]+ tok/s for 16 streams with their prompts; [\d.]+ (computing at once|taking turns)\)",
        output,
    ), output


def _greedy_chat(url: str, model: str) -> str:
    reply = httpx.post(
        f"{url}/v1/chat/completions",
        json={
            "model": model,
            "messages": [{"role": "user", "content": "Tell me about the river and the sea."}],
            "max_tokens": 16,
            "temperature": 0,
            "ignore_eos": True,
        },
        timeout=60,
    )
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["completion_tokens"] == 16
    return str(reply.json()["choices"][0]["message"]["content"])


def test_a_gguf_file_is_served_by_ggml_stages_with_the_checkpoints_reply(
    tiny_checkpoint: Callable[..., Path], tmp_path: Path
) -> None:
    """`serve --model FILE.gguf --engine ggml --stages 2`: the tokenizer, chat template and weights come
    from the file, the local worker runs ggml too, and the greedy reply equals the checkpoint's."""
    pytest.importorskip("ggml")
    from meshllm.models.gguf import write_gguf

    checkpoint = tiny_checkpoint(arch="llama", layers=4)
    gguf_file = write_gguf(checkpoint, tmp_path / "tiny-llama.gguf")
    replies = []
    for args in (
        ["--model", str(checkpoint), "--stages", "1"],
        ["--model", str(gguf_file), "--engine", "ggml", "--stages", "2"],
    ):
        serve = Serve(*args, "--port", str(free_port()))
        try:
            url = serve.wait_ready()
            models = httpx.get(f"{url}/v1/models", timeout=10).json()["data"]
            replies.append(_greedy_chat(url, models[0]["id"]))
            if "--engine" in args:
                assert models[0]["id"] == "tiny-llama"
                engines = {
                    device["engine"] for device in httpx.get(f"{url}/distributed/gpu-info").json()["devices"]
                }
                assert engines == {"ggml"}
            assert serve.stop(signal.SIGINT) == 0, serve.output
        finally:
            serve.kill()
    assert replies[0] == replies[1]


def test_a_gguf_file_on_another_engine_is_refused_naming_the_ggml_engine(
    tiny_checkpoint: Callable[..., Path], tmp_path: Path
) -> None:
    pytest.importorskip("gguf")
    from meshllm.models.gguf import write_gguf

    gguf_file = write_gguf(tiny_checkpoint(arch="qwen3", layers=4), tmp_path / "tiny.gguf")
    result = subprocess.run(
        [sys.executable, "-m", "meshllm", "serve", "--model", str(gguf_file), "--engine", "torch"]
        + ["--stages", "1", "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "only the ggml engine reads: pass --engine ggml" in result.stderr + result.stdout
