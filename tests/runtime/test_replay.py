"""A stage that dies does not end its sequences: they wait, are prefilled again on the pipeline made whole,
and go on with exactly the tokens they would have had (greedy and seeded sampling alike)."""

from __future__ import annotations

import asyncio

import pytest

from meshllm.runtime.coordinator_config import WorkerAddress
from meshllm.step import PipelineError, SamplingParams
from tests.conftest import WorkerProcess
from tests.runtime.test_coordinator import PROMPT, generate, request, start

N_TOKENS = 40
SAMPLED = SamplingParams(temperature=1.5, top_p=0.95, seed=77)


@pytest.mark.parametrize("sampling", [SamplingParams(), SAMPLED], ids=["greedy", "seeded"])
def test_a_sequence_goes_on_with_the_same_tokens_after_its_worker_is_killed_and_restarted(
    tiny_checkpoint, sampling
) -> None:
    path = tiny_checkpoint("qwen3")
    worker = WorkerProcess("replayed")
    worker.wait_ready()
    revived: list[WorkerProcess] = []

    async def run() -> tuple[list[int], list[int]]:
        coordinator = await start(path, [WorkerAddress(worker.name, worker.address)], monitor_interval=0.2)
        try:
            expected = await generate(coordinator, PROMPT, N_TOKENS, sampling)
            tokens = []
            async for token in coordinator.generate(request(PROMPT, N_TOKENS, sampling)):
                tokens.append(token.token_id)
                if len(tokens) == 5:
                    worker.kill()  # SIGKILL: the stream breaks under the steps in flight
                    await asyncio.sleep(0.5)
                    revived.append(WorkerProcess("replayed", port=worker.port))  # nothing loaded
            return expected, tokens
        finally:
            await coordinator.close()

    try:
        expected, tokens = asyncio.run(run())
    finally:
        for process in revived:
            process.kill()
    assert tokens == expected


def test_without_the_stage_back_within_the_replay_timeout_the_sequence_ends_with_the_error(
    tiny_checkpoint,
) -> None:
    path = tiny_checkpoint("qwen3")
    worker = WorkerProcess("gone")
    worker.wait_ready()

    async def run() -> str:
        coordinator = await start(
            path, [WorkerAddress(worker.name, worker.address)], monitor_interval=0.2, replay_timeout=1.0
        )
        try:
            stream = coordinator.generate(request(PROMPT, 500))
            await stream.__anext__()
            worker.kill()
            with pytest.raises(PipelineError) as ended:
                async for _ in stream:
                    pass
            return str(ended.value)
        finally:
            await coordinator.close()

    message = asyncio.run(run())
    assert "not whole again within 1 s" in message and "gone" in message
