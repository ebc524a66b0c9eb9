"""A worker that stays down: its layers are planned over the survivors, the waiting sequences go on with
exactly the tokens they would have had, and the full plan comes back once the worker does and nothing runs."""

from __future__ import annotations

import asyncio
import time

import pytest

from meshllm.runtime.coordinator import Coordinator
from meshllm.runtime.coordinator_config import WorkerAddress
from meshllm.step import PipelineError, SamplingParams
from tests.conftest import WorkerProcess
from tests.runtime.test_coordinator import generate, request, start

N_TOKENS = 24
PROMPTS = [[5 + i, 17, 42 + 3 * i, 99, 3, 250 - i, 7, 61] for i in range(8)]
# Four greedy sequences and four seeded, sampled ones.
SAMPLINGS = [SamplingParams()] * 4 + [
    SamplingParams(temperature=1.2, top_p=0.9, seed=100 + i) for i in range(4)
]


async def eight_at_once(coordinator: Coordinator, on_token=None) -> list[list[int]]:
    async def one(index: int) -> list[int]:
        tokens = []
        async for token in coordinator.generate(request(PROMPTS[index], N_TOKENS, SAMPLINGS[index])):
            tokens.append(token.token_id)
            if on_token is not None:
                on_token(index, len(tokens))
        return tokens

    return list(await asyncio.gather(*(one(i) for i in range(8))))


async def wait_for(condition, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        await asyncio.sleep(0.1)
    return condition()


def test_the_layers_of_a_worker_that_stays_down_are_planned_over_the_survivors_and_back(
    tiny_checkpoint,
) -> None:
    path = tiny_checkpoint("qwen3")
    middle, last = WorkerProcess("middle"), WorkerProcess("last")
    revived: list[WorkerProcess] = []
    for worker in (middle, last):
        worker.wait_ready()

    async def run() -> None:
        addresses = [WorkerAddress(w.name, w.address) for w in (middle, last)]
        coordinator = await start(path, addresses, monitor_interval=0.2, replan_after=1.0)
        try:
            assert [stage.device for stage in coordinator.plan] == ["coordinator", "middle", "last"]
            expected = await eight_at_once(coordinator)  # the undisturbed cluster

            def kill_halfway(index: int, produced: int) -> None:
                if index == 0 and produced == N_TOKENS // 2:
                    middle.kill()  # SIGKILL, and it never comes back

            assert await eight_at_once(coordinator, kill_halfway) == expected
            assert [stage.device for stage in coordinator.plan] == ["coordinator", "last"]
            assert coordinator.healthy
            [left_out] = coordinator.monitor.left_out()
            assert left_out.name == "middle" and "run on coordinator, last" in left_out.error
            assert coordinator.live_sequences == 0

            # The device comes back (empty): at the next idle moment the full plan is restored.
            revived.append(WorkerProcess("middle", port=middle.port))
            full = ["coordinator", "middle", "last"]
            assert await wait_for(
                lambda: [s.device for s in coordinator.plan] == full and coordinator.healthy
            )
            assert not coordinator.monitor.left_out()
            assert await generate(coordinator, PROMPTS[5], N_TOKENS, SAMPLINGS[5]) == expected[5]
        finally:
            await coordinator.close()

    try:
        asyncio.run(run())
    finally:
        for worker in (middle, last, *revived):
            worker.kill()


def test_when_the_last_worker_stays_down_the_coordinator_runs_every_layer_and_samples(
    tiny_checkpoint,
) -> None:
    path = tiny_checkpoint("qwen3")
    worker = WorkerProcess("only")
    worker.wait_ready()
    picked = [1, 2, 5, 6]  # greedy and seeded

    async def run() -> tuple[list[list[int]], list[list[int]]]:
        coordinator = await start(
            path, [WorkerAddress(worker.name, worker.address)], monitor_interval=0.2, replan_after=0.5
        )
        try:
            expected = [await generate(coordinator, PROMPTS[i], N_TOKENS, SAMPLINGS[i]) for i in picked]

            async def one(i: int) -> list[int]:
                tokens = []
                async for token in coordinator.generate(request(PROMPTS[i], N_TOKENS, SAMPLINGS[i])):
                    tokens.append(token.token_id)
                    if i == picked[0] and len(tokens) == N_TOKENS // 2:
                        worker.kill()
                return tokens

            together = list(await asyncio.gather(*(one(i) for i in picked)))
            assert [(s.device, s.layer_range) for s in coordinator.plan] == [("coordinator", (0, 4))]
            return expected, together
        finally:
            await coordinator.close()

    try:
        expected, together = asyncio.run(run())
    finally:
        worker.kill()
    assert together == expected


def test_without_the_memory_for_the_missing_layers_nothing_moves_and_health_says_why(tiny_checkpoint) -> None:
    path = tiny_checkpoint("qwen3")
    middle, last = WorkerProcess("middle"), WorkerProcess("last")
    for worker in (middle, last):
        worker.wait_ready()
    # Enough for a quarter of the model each (about 0.34 MB with headroom), not for half.
    small = {"coordinator": 400_000, "last": 400_000}

    async def run() -> None:
        addresses = [WorkerAddress(w.name, w.address) for w in (middle, last)]
        coordinator = await start(
            path,
            addresses,
            monitor_interval=0.2,
            replan_after=0.5,
            replay_timeout=3.0,
            memory_overrides=small,
        )
        try:
            assert [stage.device for stage in coordinator.plan] == ["coordinator", "middle", "last"]
            stream = coordinator.generate(request(PROMPTS[0], 500))
            await stream.__anext__()
            middle.kill()
            with pytest.raises(PipelineError, match="not whole again within 3 s"):
                async for _ in stream:
                    pass

            def reason() -> str:
                return " ".join(s.error for s in coordinator.devices_snapshot() if s.name == "middle")

            assert await wait_for(lambda: "cannot be planned over coordinator, last" in reason()), reason()
            assert "does not fit" in reason()
            assert [stage.device for stage in coordinator.plan] == ["coordinator", "middle", "last"]
            assert not coordinator.healthy
        finally:
            await coordinator.close()

    try:
        asyncio.run(run())
    finally:
        for worker in (middle, last):
            worker.kill()
