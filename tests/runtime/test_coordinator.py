"""The coordinator over gRPC: real worker processes on 127.0.0.1 give exactly the single-process tokens."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import numpy as np
import pytest

from meshllm.engines.torch import load_stage
from meshllm.errors import StageError
from meshllm.runtime.coordinator import Coordinator
from meshllm.runtime.coordinator_config import CoordinatorConfig, WorkerAddress
from meshllm.runtime.engine_client import GenerateRequest
from meshllm.step import PipelineError, SamplingParams, Segment, StepInput
from meshllm.transport.stage_client import StageClient
from tests.conftest import WorkerProcess

PROMPT = [5, 17, 42, 99, 3, 250, 7, 61, 128, 11, 300, 12]


@pytest.fixture(scope="module")
def workers():
    """Three worker processes shared by the module; every coordinator loads them with its own plan."""
    pool = [WorkerProcess(f"w{i + 1}") for i in range(3)]
    try:
        for worker in pool:
            worker.wait_ready()
        yield pool
    finally:
        for worker in pool:
            worker.kill()


def reference_greedy(path, prompt: list[int], n: int) -> list[int]:
    """Greedy tokens from one in-process stage holding every layer, driven step by step."""
    stage = load_stage(str(path), (0, 4))
    tokens, position, step_input = [], 0, list(prompt)
    for step_id in range(n):
        segment = Segment(1, position, len(step_input), sample=True)
        output = stage.forward(StepInput(step_id, [segment], token_ids=np.asarray(step_input)))
        position += len(step_input)
        step_input = [int(np.argmax(output.logits[0]))]
        tokens.append(step_input[0])
    return tokens


async def start(path, workers: list[WorkerAddress], **options) -> Coordinator:
    return await Coordinator.start(CoordinatorConfig(model=str(path), workers=tuple(workers), **options))


def request(prompt: list[int], n: int, sampling: SamplingParams | None = None) -> GenerateRequest:
    return GenerateRequest(prompt, sampling or SamplingParams(), n, ignore_eos=True)


async def generate(
    coordinator: Coordinator, prompt: list[int], n: int, sampling: SamplingParams | None = None
):
    handle = coordinator.generate(request(prompt, n, sampling))
    return [token.token_id async for token in handle]


def layout(
    workers: list[WorkerProcess], n_stages: int, local: bool = True
) -> tuple[list[WorkerAddress], bool]:
    remote = n_stages - 1 if local else n_stages
    return [WorkerAddress(w.name, w.address) for w in workers[:remote]], local


async def live_sequences(worker: WorkerProcess) -> int:
    client = StageClient(worker.name, worker.address, token=None)
    try:
        return (await client.info(timeout=5)).live_sequences
    finally:
        await client.close()


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_every_layout_gives_the_single_process_greedy_tokens(arch, tiny_checkpoint, workers):
    path = tiny_checkpoint(arch)
    expected = reference_greedy(path, PROMPT, 12)

    async def run(n_stages: int) -> list[int]:
        remote, local = layout(workers, n_stages)
        coordinator = await start(path, remote, local_stage=local)
        try:
            assert [d.layers for d in await coordinator.devices()][-1][1] == 4
            return await generate(coordinator, PROMPT, 12)
        finally:
            await coordinator.close()

    for n_stages in (1, 2, 3, 4):
        assert asyncio.run(run(n_stages)) == expected, f"{n_stages} stages"


def test_workers_only_layout_without_a_local_stage(tiny_checkpoint, workers):
    path = tiny_checkpoint("qwen3")

    async def run() -> list[int]:
        remote, _ = layout(workers, 3, local=False)
        coordinator = await start(path, remote, local_stage=False)
        try:
            return await generate(coordinator, PROMPT, 8)
        finally:
            await coordinator.close()

    assert asyncio.run(run()) == reference_greedy(path, PROMPT, 8)


def test_a_seeded_sampled_run_gives_the_same_tokens_on_every_layout(tiny_checkpoint, workers):
    path = tiny_checkpoint("llama")
    sampling = SamplingParams(temperature=3.0, top_p=0.95, top_k=50, seed=1234)

    async def run(n_stages: int) -> list[int]:
        remote, local = layout(workers, n_stages)
        coordinator = await start(path, remote, local_stage=local)
        try:
            return await generate(coordinator, PROMPT, 16, sampling)
        finally:
            await coordinator.close()

    results = [asyncio.run(run(n)) for n in (1, 2, 4)]
    assert results[0] == results[1] == results[2]
    assert len(set(results[0])) > 1  # sampled, not stuck on one token


def test_eight_concurrent_sequences_through_three_stages_match_each_alone(tiny_checkpoint, workers):
    path = tiny_checkpoint("llama")
    prompts = [[(7 * i + j) % 400 + 3 for j in range(3 + 5 * i)] for i in range(8)]

    async def run() -> tuple[list[list[int]], list[list[int]], list[int]]:
        remote, local = layout(workers, 3)
        coordinator = await start(path, remote, local_stage=local)
        try:
            alone = [await generate(coordinator, prompt, 10) for prompt in prompts]
            together = await asyncio.gather(*(generate(coordinator, prompt, 10) for prompt in prompts))
            await asyncio.sleep(0.3)  # releases are sent right after the last token
            live = [await live_sequences(worker) for worker in workers[:2]]
            return alone, list(together), live
        finally:
            await coordinator.close()

    alone, together, live = asyncio.run(run())
    assert together == alone
    assert live == [0, 0]


def test_cancelled_sequences_leave_no_cache_on_any_worker(tiny_checkpoint, workers):
    path = tiny_checkpoint("qwen3")

    async def run() -> list[int]:
        remote, local = layout(workers, 4)
        coordinator = await start(path, remote, local_stage=local)
        try:
            handles = [coordinator.generate(request(PROMPT, 500)) for _ in range(4)]
            for handle in handles:
                await handle.__anext__()
                coordinator.abort(handle.seq_id)
            for handle in handles:
                async for _ in handle:
                    pass
            await asyncio.sleep(0.5)
            assert coordinator.live_sequences == 0
            return [await live_sequences(worker) for worker in workers]
        finally:
            await coordinator.close()

    assert asyncio.run(run()) == [0, 0, 0]


def test_a_worker_refuses_calls_without_the_cluster_token_and_the_error_names_it(
    tiny_checkpoint, start_workers
):
    path = tiny_checkpoint("qwen3")
    (worker,) = start_workers(1, token="s3cret", prefix="guarded")

    async def without_token() -> None:
        await start(path, [WorkerAddress(worker.name, worker.address)], token=None)

    with pytest.raises(StageError, match=rf"device '{worker.name}' .*refused the cluster token"):
        asyncio.run(without_token())

    async def with_token() -> list[int]:
        coordinator = await start(path, [WorkerAddress(worker.name, worker.address)], token="s3cret")
        try:
            return await generate(coordinator, PROMPT, 4)
        finally:
            await coordinator.close()

    assert asyncio.run(with_token()) == reference_greedy(path, PROMPT, 4)


def test_an_unreachable_worker_is_named_with_what_to_do(tiny_checkpoint):
    from tests.conftest import free_port

    address = f"127.0.0.1:{free_port()}"

    async def start_unreachable() -> None:
        await start(tiny_checkpoint("qwen3"), [WorkerAddress("mini2", address)])

    with pytest.raises(StageError, match=r"device 'mini2' .* unreachable.*meshllm worker"):
        asyncio.run(start_unreachable())


def test_killing_a_worker_mid_generation_ends_the_request_with_an_error_quickly(
    tiny_checkpoint, start_workers
):
    path = tiny_checkpoint("qwen3")
    first, second = start_workers(2, prefix="doomed")

    async def run() -> tuple[float, str, list[str]]:
        remote = [WorkerAddress(first.name, first.address), WorkerAddress(second.name, second.address)]
        # Nothing starts the worker again: with no wait for it (replay_timeout 0), the request ends at once.
        coordinator = await start(path, remote, step_timeout=30, replay_timeout=0.0)
        try:
            handle = coordinator.generate(request(PROMPT, 1500))
            await handle.__anext__()
            os.kill(second.process.pid, signal.SIGKILL)
            killed_at = time.monotonic()
            with pytest.raises(PipelineError) as raised:
                async for _ in handle:
                    pass
            elapsed = time.monotonic() - killed_at
            await asyncio.sleep(2.5)  # the monitor notices within a couple of seconds
            statuses = [d.status for d in coordinator.devices_snapshot()]
            assert not coordinator.healthy
            return elapsed, str(raised.value), statuses
        finally:
            await coordinator.close()

    elapsed, message, statuses = asyncio.run(run())
    assert elapsed < 5.0
    assert statuses[2] == "unreachable"
    assert message  # says which link broke


def test_a_prompt_longer_than_one_step_is_prefilled_in_chunks_with_the_same_tokens(tiny_checkpoint, workers):
    path = tiny_checkpoint("llama")
    prompt = [(13 * i) % 400 + 3 for i in range(1300)]  # three steps of at most 512 tokens

    async def run() -> list[int]:
        remote, local = layout(workers, 2)
        coordinator = await start(path, remote, local_stage=local, max_step_tokens=512)
        try:
            return await generate(coordinator, prompt, 6)
        finally:
            await coordinator.close()

    assert asyncio.run(run()) == reference_greedy(path, prompt, 6)


def test_sequences_beyond_the_running_limit_wait_without_caches_and_then_complete(tiny_checkpoint):
    from meshllm.runtime.engine_loop import EngineLoop

    path = tiny_checkpoint("llama")
    stage = load_stage(str(path), (0, 4))
    prompts = [[(11 * i + j) % 400 + 3 for j in range(4 + i)] for i in range(5)]

    async def run() -> tuple[list[list[int]], int]:
        engine = EngineLoop.in_process([stage], max_running=2)
        most_caches = 0

        async def one(prompt: list[int]) -> list[int]:
            nonlocal most_caches
            tokens = []
            async for token in engine.submit(request(prompt, 6)):
                most_caches = max(most_caches, stage.live_sequences())
                tokens.append(token.token_id)
            return tokens

        results = await asyncio.gather(*(one(prompt) for prompt in prompts))
        await engine.close()
        return list(results), most_caches

    results, most_caches = asyncio.run(run())
    assert most_caches <= 2
    assert results == [reference_greedy(path, prompt, 6) for prompt in prompts]
