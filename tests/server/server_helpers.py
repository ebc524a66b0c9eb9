"""Helpers of the server tests: a 2-stage cluster behind the API (one real worker process plus the
coordinator's own stage, served by uvicorn on 127.0.0.1 from a background thread), SSE parsing, waiting."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from meshllm.runtime.local_workers import LocalWorkers
from meshllm.server.launch import ApiServer, bind_socket

TOKEN = "test-cluster-token"
API_KEY = "test-api-key"


class ClusterServer:
    """The coordinator, one local worker, and two apps on the same coordinator: open, and with an API key."""

    def __init__(self, checkpoint: Path, replay_timeout: float = 60.0) -> None:
        self.checkpoint = checkpoint
        self.replay_timeout = replay_timeout
        self.workers = LocalWorkers()
        self.coordinator: Any = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._servers: list[ApiServer] = []
        self._sockets = [bind_socket("127.0.0.1", 0), bind_socket("127.0.0.1", 0)]
        self.url = f"http://127.0.0.1:{self._sockets[0].getsockname()[1]}"
        self.keyed_url = f"http://127.0.0.1:{self._sockets[1].getsockname()[1]}"
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    @property
    def worker_pid(self) -> int:
        return self.workers.pids[0]

    def start(self, timeout: float = 180.0) -> ClusterServer:
        self.worker_addresses = self.workers.spawn(1, token=TOKEN, threads=1)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError("the test cluster did not start in time")
        if self._error is not None:
            raise self._error
        return self

    async def _main(self) -> None:
        from meshllm.runtime.coordinator import Coordinator
        from meshllm.runtime.coordinator_config import CoordinatorConfig
        from meshllm.server.app import build_app

        try:
            await self.workers.wait_healthy(TOKEN)
            self.coordinator = await Coordinator.start(
                CoordinatorConfig(
                    model=str(self.checkpoint),
                    workers=tuple(self.worker_addresses),
                    token=TOKEN,
                    replay_timeout=self.replay_timeout,
                )
            )
            self.loop = asyncio.get_running_loop()
            self._servers = [
                ApiServer(build_app(self.coordinator)),
                ApiServer(build_app(self.coordinator, api_key=API_KEY)),
            ]
            tasks = [
                asyncio.create_task(server.serve(sockets=[sock]))
                for server, sock in zip(self._servers, self._sockets, strict=True)
            ]
            while not all(server.started for server in self._servers):
                await asyncio.sleep(0.02)
            self._ready.set()
            await asyncio.gather(*tasks)
        except BaseException as error:
            self._error = error
            self._ready.set()
        finally:
            if self.coordinator is not None:
                await self.coordinator.close()

    def call(self, function: Callable[[], Any]) -> Any:
        """Runs `function` on the server's event loop (the coordinator is not thread-safe) and returns its value."""
        assert self.loop is not None

        async def wrapper() -> Any:
            return function()

        return asyncio.run_coroutine_threadsafe(wrapper(), self.loop).result(timeout=10)

    def stop(self) -> None:
        for server in self._servers:
            server.should_exit = True
        self._thread.join(timeout=30)
        self.workers.stop()
        for sock in self._sockets:
            sock.close()


def wait_until(condition: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()


def sse_events(response: httpx.Response) -> list[Any]:
    """The `data:` payloads of an SSE response, JSON-decoded, with "[DONE]" kept as the string."""
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            payload = line[len("data: ") :]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
        else:
            assert line == "", f"unexpected SSE line {line!r}"
    return events
