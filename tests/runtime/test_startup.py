"""Starting a coordinator: what it refuses before it loads anything."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from meshllm import __version__
from meshllm.errors import StageError
from meshllm.models.checkpoint import Checkpoint
from meshllm.models.tiny import make_checkpoint
from meshllm.runtime.coordinator_config import WorkerAddress
from tests.conftest import WorkerProcess
from tests.runtime.test_coordinator import PROMPT, generate, reference_greedy, start


def test_a_worker_of_another_meshllm_version_is_refused_naming_both_versions(tiny_checkpoint, tmp_path: Path):
    # A worker whose meshllm reports 0.0.9: a sitecustomize on its path rewrites the version at start.
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "sitecustomize.py").write_text("import meshllm\nmeshllm.__version__ = '0.0.9'\n")
    worker = WorkerProcess("old1", env={"PYTHONPATH": str(tmp_path / "old")})
    try:
        worker.wait_ready()
        with pytest.raises(StageError) as refused:
            asyncio.run(start(tiny_checkpoint("qwen3"), [WorkerAddress(worker.name, worker.address)]))
    finally:
        worker.kill()
    message = str(refused.value)
    assert f"device 'old1' ({worker.address}) runs meshllm 0.0.9" in message
    assert f"the coordinator {__version__}" in message and "install the same version on both" in message


def test_a_worker_of_the_same_version_is_accepted(tiny_checkpoint, start_workers):
    path = tiny_checkpoint("qwen3")
    (worker,) = start_workers(1, prefix="same")

    async def run() -> list[int]:
        coordinator = await start(path, [WorkerAddress(worker.name, worker.address)])
        try:
            return await generate(coordinator, PROMPT, 4)
        finally:
            await coordinator.close()

    assert asyncio.run(run()) == reference_greedy(path, PROMPT, 4)


def test_a_model_is_served_in_its_own_dtype_where_none_is_asked(tmp_path: Path, start_workers) -> None:
    # A bfloat16 checkpoint (as most on the hub are), served without a dtype: every stage, the
    # coordinator's and the worker's, holds bfloat16 weights, half the bytes of float32.
    path = make_checkpoint(tmp_path / "bf16", dtype="bfloat16")
    (worker,) = start_workers(1, prefix="own")

    async def weight_bytes(**options) -> list[int]:
        coordinator = await start(path, [WorkerAddress(worker.name, worker.address)], **options)
        try:
            assert len(await generate(coordinator, PROMPT, 3)) == 3
            return [device.weight_bytes for device in await coordinator.devices()]
        finally:
            await coordinator.close()

    own = asyncio.run(weight_bytes())
    wide = asyncio.run(weight_bytes(dtype="float32"))
    assert [2 * n for n in own] == pytest.approx(wide, rel=0.01)  # norms may stay float32
    assert Checkpoint.open(str(path)).own_dtype == "bfloat16"
