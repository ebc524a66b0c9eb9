"""One pipeline, several engines: torch, ggml and MLX stages exchange engine-neutral wire tensors."""

from __future__ import annotations

import asyncio

import pytest

from meshllm.runtime.coordinator_config import WorkerAddress
from tests.runtime.test_coordinator import PROMPT, reference_greedy, request, start

pytest.importorskip("mlx.core")


async def greedy(path, engine: str, workers, n: int) -> tuple[list[int], list[str]]:
    coordinator = await start(path, workers, engine=engine)
    try:
        handle = coordinator.generate(request(PROMPT, n))
        tokens = [token.token_id async for token in handle]
        return tokens, [device.engine for device in await coordinator.devices()]
    finally:
        await coordinator.close()


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_torch_then_mlx_gives_the_single_engine_tokens(arch, tiny_checkpoint, start_workers):
    path = tiny_checkpoint(arch)
    (mlx_worker,) = start_workers(1, engine="mlx", prefix="mlx")
    tokens, engines = asyncio.run(
        greedy(path, "torch", [WorkerAddress(mlx_worker.name, mlx_worker.address)], 10)
    )
    assert engines == ["torch", "mlx"]
    assert tokens == reference_greedy(path, PROMPT, 10)


def test_mlx_then_torch_then_mlx_gives_the_single_engine_tokens(tiny_checkpoint, start_workers):
    path = tiny_checkpoint("qwen3")
    (torch_worker,) = start_workers(1, engine="torch", prefix="torch")
    (mlx_worker,) = start_workers(1, engine="mlx", prefix="mlx")
    workers = [WorkerAddress(w.name, w.address) for w in (torch_worker, mlx_worker)]
    tokens, engines = asyncio.run(greedy(path, "mlx", workers, 10))
    assert engines == ["mlx", "torch", "mlx"]
    assert tokens == reference_greedy(path, PROMPT, 10)


def test_torch_then_ggml_then_mlx_gives_the_single_engine_tokens(tiny_checkpoint, start_workers):
    """A ggml stage between a torch and an MLX stage, each in its own process, over gRPC."""
    pytest.importorskip("ggml")
    path = tiny_checkpoint("qwen3")
    (ggml_worker,) = start_workers(1, engine="ggml", prefix="ggml")
    (mlx_worker,) = start_workers(1, engine="mlx", prefix="mlx")
    workers = [WorkerAddress(w.name, w.address) for w in (ggml_worker, mlx_worker)]
    tokens, engines = asyncio.run(greedy(path, "torch", workers, 10))
    assert engines == ["torch", "ggml", "mlx"]
    assert tokens == reference_greedy(path, PROMPT, 10)
