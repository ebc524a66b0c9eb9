"""The layer plan by cost: each stage's bytes read per token over its device's speed, within its memory."""

from __future__ import annotations

import pytest

from meshllm.errors import ConfigError
from meshllm.models.balance import ModelCosts, balance
from meshllm.models.checkpoint import Checkpoint
from meshllm.models.plan import make_plan

MB = 10**6
# Qwen3-0.6B in bfloat16: 28 layers of 30 MB, a 311 MB embedding that is also the lm_head.
QWEN3_0_6B = ModelCosts([30 * MB] * 28, embedding=311 * MB, head=311 * MB, head_is_embedding=True)
PLENTY = 100e9


def test_the_last_stage_carries_the_lm_head_so_it_gets_fewer_layers() -> None:
    ranges = balance([QWEN3_0_6B] * 2, [1.0, 1.0], [PLENTY] * 2, headroom=1.2)
    assert ranges == [(0, 19), (19, 28)]  # 570 MB read per token on each side, against 14/14's 420/731


def test_the_embedding_is_held_but_not_read() -> None:
    assert QWEN3_0_6B.read(0, 10) == 300 * MB and QWEN3_0_6B.held(0, 10) == 611 * MB
    assert QWEN3_0_6B.read(20, 28) == 551 * MB
    assert QWEN3_0_6B.held(0, 28) == 28 * 30 * MB + 311 * MB  # tied: one matrix for both


def test_a_slower_device_gets_fewer_layers() -> None:
    even = balance([QWEN3_0_6B] * 2, [1.0, 1.0], [PLENTY] * 2, headroom=1.2)
    slow_first = balance([QWEN3_0_6B] * 2, [0.5, 1.0], [PLENTY] * 2, headroom=1.2)
    assert even is not None and slow_first is not None
    assert slow_first[0].size < even[0].size
    assert slow_first == [(0, 13), (13, 28)]  # 390 MB at half speed (780) against 15 * 30 + 311 = 761


def test_memory_bounds_the_split_whatever_the_speed() -> None:
    small = 8 * 30 * MB * 1.2 + 1  # eight layers and nothing else fit in the last device
    ranges = balance([QWEN3_0_6B] * 2, [1.0, 10.0], [PLENTY, small], headroom=1.2)
    assert ranges is not None and ranges[1].size <= 8 - 10 or ranges is None


def test_nothing_fits_is_none() -> None:
    assert balance([QWEN3_0_6B] * 2, [1.0, 1.0], [100 * MB, 100 * MB], headroom=1.2) is None


def test_make_plan_follows_the_measured_speeds(tiny_checkpoint) -> None:
    checkpoint = Checkpoint.open(tiny_checkpoint("llama", layers=6))
    devices = [("a", 10**9), ("b", 10**9)]
    even = make_plan(checkpoint, devices)
    slow_b = make_plan(checkpoint, devices, speeds={"a": 1.0, "b": 0.25})
    assert slow_b[1].layer_range.size < even[1].layer_range.size
    overridden = make_plan(
        checkpoint, devices, layer_overrides={"a": (0, 1), "b": (1, 6)}, speeds={"a": 1.0, "b": 0.25}
    )
    assert [stage.layer_range for stage in overridden] == [(0, 1), (1, 6)]  # overrides stay


def test_a_model_that_does_not_fit_names_every_device_short_of_memory(tiny_checkpoint) -> None:
    checkpoint = Checkpoint.open(tiny_checkpoint("llama", layers=6))
    with pytest.raises(ConfigError, match=r"the model does not fit: a needs .* GB for layers \[0, 3\)"):
        make_plan(checkpoint, [("a", 1000), ("b", 1000)])
