"""The coordinator's watch over its workers: a worker that dies is reported, one that comes back is
loaded again and serves the same tokens."""

from __future__ import annotations

import asyncio
import time

from meshllm.runtime.coordinator_config import WorkerAddress
from tests.conftest import WorkerProcess
from tests.runtime.test_coordinator import PROMPT, generate, reference_greedy, start


async def wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.1)
    return predicate()


def test_a_restarted_worker_is_loaded_again_and_serves_the_same_tokens(tiny_checkpoint):
    path = tiny_checkpoint("qwen3")
    worker = WorkerProcess("phoenix")
    worker.wait_ready()
    revived: WorkerProcess | None = None

    async def run() -> tuple[list[str], list[int], list[int]]:
        nonlocal revived
        coordinator = await start(path, [WorkerAddress(worker.name, worker.address)], monitor_interval=0.2)
        try:
            before = await generate(coordinator, PROMPT, 6)
            worker.kill()
            seen = []
            await wait_for(lambda: not coordinator.healthy, 10.0)
            seen.append(coordinator.devices_snapshot()[1].status)
            revived = WorkerProcess("phoenix", port=worker.port)  # the same address, nothing loaded
            revived.wait_ready()
            assert await wait_for(lambda: coordinator.healthy, 30.0), coordinator.devices_snapshot()
            seen.append(coordinator.devices_snapshot()[1].status)
            return seen, before, await generate(coordinator, PROMPT, 6)
        finally:
            await coordinator.close()

    try:
        seen, before, after = asyncio.run(run())
    finally:
        if revived is not None:
            revived.kill()
    assert seen == ["unreachable", "healthy"]
    assert before == after == reference_greedy(path, PROMPT, 6)
