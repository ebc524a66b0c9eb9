"""Stages that share a compute unit (this machine's cores) take turns: the pipeline keeps one step in
flight per unit, and a worker pinned to cores of its own is a unit of its own."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from meshllm.defaults import PREDICT_ENV
from meshllm.devices import compute_unit, describe_host, steps_in_flight
from meshllm.errors import ConfigError
from meshllm.runtime.coordinator import Coordinator
from meshllm.runtime.coordinator_config import CoordinatorConfig, WorkerAddress
from meshllm.runtime.engine_client import GenerateRequest
from meshllm.step import SamplingParams
from meshllm.transport.stage_client import StageClient

CORES = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
needs_two_cores = pytest.mark.skipif(len(CORES) < 2, reason="needs two cores to pin a worker to one")


def unit_in_a_process(cores: list[int] | None = None) -> str:
    code = "import os, sys\n"
    if cores is not None:
        code += f"os.sched_setaffinity(0, {set(cores)!r})\n"
    code += "from meshllm.devices import compute_unit\nprint(compute_unit('cpu'))\n"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    return done.stdout.strip()


def test_processes_on_the_same_cores_name_one_unit_and_a_process_on_others_another() -> None:
    here = compute_unit("cpu")
    assert unit_in_a_process() == here
    assert describe_host("cpu").compute == here
    assert compute_unit("mps") == compute_unit("metal") != here  # a Mac's one GPU
    if len(CORES) >= 2:
        pinned = unit_in_a_process([CORES[0]])
        assert pinned != here and pinned.endswith(f"/cpu/{CORES[0]}")
        assert unit_in_a_process([CORES[0]]) == pinned


def test_one_step_in_flight_per_unit_and_a_stage_of_unknown_unit_counts_as_its_own() -> None:
    assert steps_in_flight(["m/cpu/0-1", "m/cpu/0-1"]) == 1
    assert steps_in_flight(["m/cpu/0-1", "m/cpu/0-1", "n/cpu/0-7"]) == 2
    assert steps_in_flight(["m/cpu/0", "m/cpu/1"]) == 2
    assert steps_in_flight(["", ""]) == 2  # workers that do not say: one step each, as before
    assert steps_in_flight([]) == 1


async def depth_of(
    path: Path, workers: list[WorkerAddress], shared_stages: str = "turns"
) -> tuple[int, list[int]]:
    config = CoordinatorConfig(model=str(path), workers=tuple(workers), shared_stages=shared_stages)
    coordinator = await Coordinator.start(config)
    try:
        request = GenerateRequest([5, 17, 42, 99], SamplingParams(), 6, ignore_eos=True)
        tokens = [token.token_id async for token in coordinator.generate(request)]
        return coordinator.loop.scheduler.max_in_flight, tokens
    finally:
        await coordinator.close()


async def unit_of(worker) -> str:
    client = StageClient(worker.name, worker.address, token=None)
    try:
        return (await client.info(timeout=10)).compute
    finally:
        await client.close()


@needs_two_cores
def test_stages_on_this_machines_cores_take_turns_and_a_pinned_worker_computes_beside_them(
    tiny_checkpoint: Callable[..., Path],
    start_workers,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.INFO, logger="meshllm.runtime.startup")
    monkeypatch.setenv(PREDICT_ENV, "1")  # the start measures the devices and predicts both ways
    path = tiny_checkpoint("qwen3")
    shared, pinned = start_workers(1) + start_workers(1, args=["--cores", str(CORES[0])], prefix="p")
    assert asyncio.run(unit_of(shared)) == compute_unit("cpu")  # over gRPC, from its Info
    assert asyncio.run(unit_of(pinned)).endswith(f"/cpu/{CORES[0]}")
    # The coordinator's stage and the unpinned worker share every core: taking turns, one step at a time.
    depth, tokens = asyncio.run(depth_of(path, [WorkerAddress(shared.name, shared.address)]))
    assert depth == 1
    assert "2 stages compute on 1 unit (stages that share a machine's cores take turns)" in caplog.text
    assert "stages on the same cores: taking turns, one step at a time (" in caplog.text  # predicted
    caplog.clear()
    # Computing at once instead: a step each.
    depth, together = asyncio.run(
        depth_of(path, [WorkerAddress(shared.name, shared.address)], shared_stages="together")
    )
    assert depth == 2 and together == tokens
    assert "stages on the same cores: computing at once, a micro-batch each (" in caplog.text
    caplog.clear()
    # The pinned worker has a core of its own: a step each, whatever stages on the same cores do.
    depth, pinned_tokens = asyncio.run(depth_of(path, [WorkerAddress(pinned.name, pinned.address)]))
    assert depth == 2
    assert "compute on" not in caplog.text and "stages on the same cores" not in caplog.text
    assert pinned_tokens == tokens
    # Left to the prediction, the start says which it chose and keeps as many steps in flight.
    depth, _ = asyncio.run(depth_of(path, [WorkerAddress(shared.name, shared.address)], shared_stages="auto"))
    chose_turns = "stages on the same cores: taking turns" in caplog.text
    assert chose_turns or "stages on the same cores: computing at once" in caplog.text
    assert depth == (1 if chose_turns else 2)


def test_a_way_for_stages_on_the_same_cores_that_is_no_way_is_refused_naming_it() -> None:
    with pytest.raises(ConfigError, match="shared_stages: 'alternate' is not one of turns, together, auto"):
        CoordinatorConfig(model="demo", shared_stages="alternate")
