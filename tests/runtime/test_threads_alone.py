"""Threads of stages that share a machine: a step alone in the pipeline takes every core it was given
(`--threads-alone`), one among others its share (`--threads`); the scheduler says which a step is."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from meshllm.devices import Precision
from meshllm.engines.ggml import load_stage as load_ggml_stage
from meshllm.engines.torch import load_stage as load_torch_stage
from meshllm.runtime.engine_client import GenerateRequest
from meshllm.runtime.scheduler import Scheduler
from meshllm.runtime.stage_host import LocalStageHost
from meshllm.step import SampledToken, SamplingParams, Segment, StepInput


def threads_of(host: LocalStageHost) -> int:
    stage = host.stage
    return int(stage.threads) if host.engine == "ggml" else torch.get_num_threads()  # type: ignore[union-attr]


@pytest.mark.parametrize("engine", ["torch", "ggml"])
def test_a_step_alone_takes_the_threads_alone_and_one_among_others_its_share(
    engine: str, tiny_checkpoint: Callable[..., Path]
) -> None:
    load = load_torch_stage if engine == "torch" else load_ggml_stage
    stage = load(str(tiny_checkpoint("qwen3")), (0, 4))
    host = LocalStageHost.of("s0", stage)
    before = torch.get_num_threads()
    try:
        host.set_threads(1, 2)
        seen = []
        for step_id, (position, alone) in enumerate([(0, True), (3, False), (4, True), (5, True)]):
            count = 3 if position == 0 else 1
            segment = Segment(1, position, count, sample=True, sampling=SamplingParams(seed=1))
            step = StepInput(step_id, [segment], token_ids=np.arange(5, 5 + count), alone=alone)
            host.step(step)
            seen.append(threads_of(host))
        assert seen == [2, 1, 2, 2]
    finally:
        torch.set_num_threads(before)


def test_the_only_step_in_flight_is_alone_and_those_sent_beside_it_are_not() -> None:
    scheduler = Scheduler(max_in_flight=2)
    for first in (10, 20):
        scheduler.add(GenerateRequest([first, first + 1], SamplingParams(), 4))
    a = scheduler.schedule()
    b = scheduler.schedule()
    assert a is not None and b is not None
    assert (a.input.alone, b.input.alone) == (True, False)
    scheduler.update(a.step_id, [SampledToken(a.seq_ids[0], 7, 0.0)])
    scheduler.update(b.step_id, [SampledToken(b.seq_ids[0], 7, 0.0)])
    scheduler.abort(b.seq_ids[0])
    c = scheduler.schedule()
    assert c is not None and c.input.alone  # the other sequence ended: this step is alone again


def test_a_host_with_threads_for_a_step_alone_measures_its_read_speed_with_them_too() -> None:
    host = LocalStageHost("s0", engine="torch")
    before = torch.get_num_threads()
    host.set_threads(1, 2)
    calibration = host.calibrate(Precision("float32"))
    assert calibration.read_bandwidth > 0 and calibration.alone_read_bandwidth > 0
    assert torch.get_num_threads() == before  # measured with each count, then put back
    plain = LocalStageHost("s1", engine="torch")
    assert plain.calibrate(Precision("float32")).alone_read_bandwidth == 0.0  # nothing more to measure
