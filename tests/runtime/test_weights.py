"""Weights over the cluster, for real: `meshllm serve` on a hub id only it has, two worker processes with
no model and an empty hub cache, chat replies equal to the single-process engine's; a restart receives
0 bytes; a damaged cache file is found, discarded and fetched again."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from meshllm.models.share import read_header
from tests.conftest import WorkerProcess, free_port

TOKEN = "weights-test-token"
HUB_ID = "tiny/model"
REVISION = "0123456789abcdef0123456789abcdef01234567"
MESSAGES = [{"role": "user", "content": "Tell me about the weather and the sea."}]
RECEIVED = re.compile(r"weights of layers \[(\d+), (\d+)\): (\d+) bytes received")


def hub_cache(checkpoint: Path, home: Path) -> Path:
    """A Hugging Face cache in `home` holding `checkpoint` as HUB_ID (what a download would have left)."""
    repo = home / "hub" / f"models--{HUB_ID.replace('/', '--')}"
    shutil.copytree(checkpoint, repo / "snapshots" / REVISION)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(REVISION)
    return home


class Serve:
    """A `meshllm serve` process, its output collected line by line, stopped by pid."""

    def __init__(self, args: list[str], env: dict[str, str]):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "meshllm", "serve", "--served-model-name", "x", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **env},
        )
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_ready(self, timeout: float = 240.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines:
                found = re.search(r"API ready at (http://127\.0\.0\.1:\d+)/v1", line)
                if found:
                    return found.group(1)
            if self.process.poll() is not None:
                raise RuntimeError("serve exited:\n" + "\n".join(self.lines[-40:]))
            time.sleep(0.1)
        raise TimeoutError("serve was not ready:\n" + "\n".join(self.lines[-40:]))

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def chat(url: str, n: int = 12) -> str:
    body = {"model": "x", "messages": MESSAGES, "max_tokens": n, "temperature": 0, "ignore_eos": True}
    reply = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
    assert reply.status_code == 200, reply.text
    return str(reply.json()["choices"][0]["message"]["content"])


@contextlib.contextmanager
def serving(args: list[str], env: dict[str, str]) -> Iterator[tuple[Serve, str]]:
    serve = Serve(args, env)
    try:
        yield serve, serve.wait_ready()
    finally:
        serve.stop()


def reference_reply(checkpoint: Path, tmp_path: Path) -> str:
    """The single-process engine's reply: one `serve --stages 1` holding every layer."""
    args = ["--model", str(checkpoint), "--stages", "1", "--port", str(free_port())]
    with serving(args, {"MESHLLM_CACHE": str(tmp_path / "reference-cache")}) as (_, url):
        return chat(url)


def worker_env(tmp_path: Path, name: str) -> dict[str, str]:
    """A worker with no model: an empty hub cache, the hub switched off, its own empty caches."""
    home = tmp_path / f"{name}-home"
    (home / "hf").mkdir(parents=True, exist_ok=True)
    return {
        "HF_HOME": str(home / "hf"),
        "HF_HUB_OFFLINE": "1",
        "MESHLLM_CACHE": str(home / "meshllm"),
        "MESHLLM_WEIGHTS_CACHE": str(home / "weights"),
    }


def worker_process(tmp_path: Path, name: str, port: int | None = None) -> WorkerProcess:
    """A worker running in an empty folder of its own, with `worker_env`'s empty caches."""
    folder = tmp_path / f"{name}-workdir"
    folder.mkdir(exist_ok=True)
    return WorkerProcess(name, TOKEN, port=port, env=worker_env(tmp_path, name), cwd=str(folder))


def start_worker(tmp_path: Path, name: str, port: int | None = None) -> WorkerProcess:
    worker = worker_process(tmp_path, name, port)
    worker.wait_ready()
    return worker


def received(worker: WorkerProcess) -> list[int]:
    """Bytes received, per load, as the worker's log says."""
    return [int(match.group(3)) for match in RECEIVED.finditer(Path(worker.log.name).read_text())]


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise TimeoutError(what)


def mlx_quantized(checkpoint: Path, folder: Path) -> Path:
    pytest.importorskip("mlx.core")
    convert = pytest.importorskip("mlx_lm.convert").convert
    with contextlib.redirect_stdout(io.StringIO()):
        convert(str(checkpoint), str(folder), quantize=True, q_bits=4, q_group_size=32)
    return folder


@pytest.mark.parametrize("kind", ["float32", "mlx-4bit"])
def test_workers_without_the_model_serve_the_single_process_reply_and_restart_from_their_cache(
    kind: str, tiny_checkpoint: Callable[..., Path], tmp_path: Path
) -> None:
    checkpoint = tiny_checkpoint("qwen3", layers=6)
    if kind == "mlx-4bit":
        checkpoint = mlx_quantized(checkpoint, tmp_path / "quantized")
    expected = reference_reply(checkpoint, tmp_path)
    coordinator_env = {
        "HF_HOME": str(hub_cache(checkpoint, tmp_path / "coordinator-hf")),
        "HF_HUB_OFFLINE": "1",
        "MESHLLM_CACHE": str(tmp_path / "coordinator-cache"),
    }
    workers = [start_worker(tmp_path, "w1"), start_worker(tmp_path, "w2")]
    try:
        args = ["--model", HUB_ID, "--port", str(free_port()), "--weights-port", str(free_port())]
        args += ["--token", TOKEN, "--workers", ",".join(f"{w.name}={w.address}" for w in workers)]
        args += ["--memory", "coordinator=1,w1=1,w2=1"]
        with serving(args, coordinator_env) as (serve, url):
            assert chat(url) == expected
            assert not any(any((tmp_path / f"{w.name}-workdir").iterdir()) for w in workers)  # still empty
            first = [received(worker) for worker in workers]
            assert all(len(loads) == 1 and loads[0] > 0 for loads in first), first
            if kind == "mlx-4bit":  # travelled quantized: packed weights with their scales and biases
                share = next((tmp_path / "w1-home" / "weights").glob("*/layers-*"))
                header = read_header(sorted(share.glob("layer-*.safetensors"))[0])[1]
                packed = [name for name in header if name.endswith("q_proj.weight")]
                assert packed and header[packed[0]]["dtype"] == "U32"
                assert any(name.endswith("q_proj.scales") for name in header)
            done_lines = [
                line for line in serve.lines if re.match(r"w[12]: layers \[\d+, \d+\) loaded", line)
            ]
            assert len(done_lines) == 2, serve.lines

            # Restarted on the same ports, the workers find their shares in the cache: 0 bytes.
            for index, worker in enumerate(workers):
                worker.process.kill()
                worker.process.wait(timeout=10)
                log = worker.log
                workers[index] = restarted = worker_process(tmp_path, worker.name, worker.port)
                restarted.wait_ready()
                log.close()
            wait_for(lambda: all(received(worker) == [0] for worker in workers), 120, "reload from cache")
            wait_for(lambda: chat_or_none(url) == expected, 120, "the same reply after the restart")

            # A damaged file in w2's cache is found, discarded and fetched again: just that file.
            share = next((tmp_path / "w2-home" / "weights").glob("*/layers-*"))
            damaged = sorted(share.glob("layer-*.safetensors"))[0]
            size = damaged.stat().st_size  # the file is gone while the worker fetches it again
            with open(damaged, "r+b") as handle:
                handle.seek(size - 16)
                handle.write(b"\xff" * 16)
            w2 = workers[1]
            w2.process.kill()
            w2.process.wait(timeout=10)
            workers[1] = worker_process(tmp_path, w2.name, w2.port)
            workers[1].wait_ready()
            wait_for(lambda: received(workers[1]) == [size], 120, "the damaged file fetched")
            log_text = Path(workers[1].log.name).read_text()
            assert "is damaged or changed; discarded, fetching it again" in log_text
            assert "1 damaged files discarded and fetched again" in log_text
            wait_for(lambda: chat_or_none(url) == expected, 120, "the same reply after the refetch")
    finally:
        for worker in workers:
            worker.kill()


def chat_or_none(url: str) -> str | None:
    try:
        return chat(url)
    except AssertionError:  # 503 while a worker reloads
        return None


def rss(pid: int) -> int:
    """Resident bytes of a process (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


RSS_MARGIN = 0.25  # of the share: allocator slack and the stage's small buffers
RSS_SLACK = 64 * 1024 * 1024  # bytes: the first forward pass's code paths and arenas


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RSS from /proc")
def test_a_worker_s_memory_and_cache_hold_its_share_only(tmp_path: Path) -> None:
    """A 200 MB float32 checkpoint; the worker takes layers [4, 8) and the head, about half of it."""
    from meshllm.models.checkpoint import Checkpoint
    from meshllm.models.share import share_bytes
    from meshllm.models.tiny import TinySpec, make_checkpoint
    from meshllm.runtime.weights import CheckpointWeights
    from meshllm.step import LayerRange
    from meshllm.transport.stage import LoadSpec, WeightsFrom
    from meshllm.transport.stage_client import StageClient
    from meshllm.transport.weights import WeightsServer

    spec = TinySpec(
        hidden_size=512,
        intermediate_size=2048,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=64,
        vocab_size=512,
    )
    path = make_checkpoint(tmp_path / "model", arch="llama", spec=spec)
    checkpoint = Checkpoint.open(path)
    layer_range = LayerRange(4, 8)
    share = share_bytes(checkpoint, layer_range)
    whole = sum(p.stat().st_size for p in path.glob("*.safetensors"))
    assert 0.4 * whole < share < 0.6 * whole
    worker = start_worker(tmp_path, "big")

    async def run() -> tuple[int, int]:
        source = CheckpointWeights(checkpoint)
        server = WeightsServer(source, f"127.0.0.1:{free_port()}", TOKEN, "coordinator")
        await server.start()
        client = StageClient(worker.name, worker.address, TOKEN)
        try:
            await client.info(timeout=120)  # imports the engine: the baseline
            before = rss(worker.process.pid)
            load = LoadSpec(
                str(path), layer_range, "float32", weights=WeightsFrom(server.address, source.key)
            )
            await client.load(load, "", lambda update: None)
            return before, rss(worker.process.pid)
        finally:
            await client.close()
            await server.stop()

    try:
        before, after = asyncio.run(run())
    finally:
        worker.kill()
    cache = sum(p.stat().st_size for p in (tmp_path / "big-home" / "weights").rglob("*") if p.is_file())
    print(f"share {share / 1e6:.1f} MB, RSS +{(after - before) / 1e6:.1f} MB, cache {cache / 1e6:.1f} MB")
    assert after - before <= share * (1 + RSS_MARGIN) + RSS_SLACK
    assert share <= cache <= share + 64 * 1024  # the share's files and their sha256 list


def test_local_workers_fetch_their_weights_too_when_asked(
    tiny_checkpoint: Callable[..., Path], tmp_path: Path
) -> None:
    checkpoint = tiny_checkpoint("qwen3", layers=6)
    expected = reference_reply(checkpoint, tmp_path)
    cache = tmp_path / "local-weights"
    args = ["--model", str(checkpoint), "--stages", "3", "--weights", "cluster"]
    args += ["--port", str(free_port()), "--weights-port", str(free_port())]
    env = {"MESHLLM_WEIGHTS_CACHE": str(cache), "MESHLLM_CACHE": str(tmp_path / "serve-cache")}
    with serving(args, env) as (serve, url):
        assert chat(url) == expected
    shares = sorted(folder.name for folder in cache.glob("*/layers-*"))
    assert len(shares) == 2, shares  # one per local worker
    assert sum(1 for line in serve.lines if "bytes received" in line and line.startswith("worker")) == 2, (
        serve.lines
    )


def test_a_model_path_for_a_device_that_is_no_worker_is_refused_by_name() -> None:
    from meshllm.errors import ConfigError
    from meshllm.runtime.coordinator_config import CoordinatorConfig, WorkerAddress

    workers = (WorkerAddress("w1", "127.0.0.1:1"),)
    with pytest.raises(ConfigError, match="a model path is given for w9, which is no worker"):
        CoordinatorConfig(model="demo", workers=workers, device_models={"w9": "/m"})
    config = CoordinatorConfig(model="demo", workers=workers, weights_listen="127.0.0.1:2", device_models={})
    assert (config.weights_of("w1"), config.model_of("w1")) == ("127.0.0.1:2", "demo")
    own = CoordinatorConfig(
        model="demo", workers=workers, weights_listen="127.0.0.1:2", device_models={"w1": "/m"}
    )
    assert (own.weights_of("w1"), own.model_of("w1")) == (None, "/m")


def test_workers_without_a_gguf_file_take_their_ranges_of_it_from_the_coordinator(
    tiny_checkpoint: Callable[..., Path], tmp_path: Path
) -> None:
    """A GGUF model over the cluster: each ggml worker receives one GGUF file of its own range (metadata,
    tokenizer and its tensors as stored) and the reply is the single-process one."""
    pytest.importorskip("ggml")
    from meshllm.models.checkpoint import Checkpoint
    from meshllm.models.gguf import write_gguf

    model = write_gguf(tiny_checkpoint("llama", layers=6), tmp_path / "tiny-llama.gguf", "Q8_0")
    args = ["--model", str(model), "--engine", "ggml", "--stages", "1", "--port", str(free_port())]
    with serving(args, {"MESHLLM_CACHE": str(tmp_path / "reference-cache")}) as (_, url):
        expected = chat(url)
    workers = [
        WorkerProcess(name, TOKEN, engine="ggml", env=worker_env(tmp_path, name), cwd=str(tmp_path))
        for name in ("w1", "w2")
    ]
    try:
        for worker in workers:
            worker.wait_ready()
        args = ["--model", str(model), "--engine", "ggml", "--port", str(free_port())]
        args += ["--weights-port", str(free_port()), "--token", TOKEN]
        args += ["--workers", ",".join(f"{w.name}={w.address}" for w in workers)]
        args += ["--memory", "coordinator=1,w1=1,w2=1"]
        with serving(args, {"MESHLLM_CACHE": str(tmp_path / "coordinator-cache")}) as (_, url):
            assert chat(url) == expected
        whole = Checkpoint.open(model).gguf
        assert whole is not None
        for worker in workers:
            [share] = (tmp_path / f"{worker.name}-home" / "weights").glob("*/layers-*/model.gguf")
            start, end = (int(n) for n in share.parent.name.removeprefix("layers-").split("-"))
            assert received(worker) == [share.stat().st_size] and share.stat().st_size < model.stat().st_size
            part = Checkpoint.open(share.parent).gguf
            assert part is not None and part.config == whole.config  # untied, said by the share itself
            layers = {name.split(".")[2] for name in part.weight_names if name.startswith("model.layers.")}
            assert layers == {str(index) for index in range(start, end)}
            for name in part.weight_names:  # as stored, byte for byte
                assert np.array_equal(part.tensors[name].data, whole.tensors[name].data), name
    finally:
        for worker in workers:
            worker.kill()
