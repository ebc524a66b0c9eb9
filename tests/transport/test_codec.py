"""The step types to protobuf and back: everything a stage sends arrives as it left."""

from __future__ import annotations

import numpy as np
import torch

from meshllm.devices import StageInfo
from meshllm.step import LayerRange, SampledToken, SamplingParams, Segment, StageTiming, StepInput, StepResult
from meshllm.transport import codec

SEGMENTS = [
    Segment(7, 0, 3, sample=True, sampling=SamplingParams(0.7, 0.9, 40, 12345, 2, (2, 5))),
    Segment(1 << 40, 12, 1, sample=False),
]


def test_a_step_of_token_ids_comes_back_equal() -> None:
    step = StepInput(9, SEGMENTS, token_ids=np.array([3, 4, 5, 6], dtype=np.int64))
    back = codec.decode_step(codec.encode_step(step), "torch")
    assert (back.step_id, back.segments, back.hidden_states) == (9, SEGMENTS, None)
    assert back.token_ids is not None and back.token_ids.tolist() == [3, 4, 5, 6]


def test_bfloat16_hidden_states_come_back_bit_for_bit() -> None:
    hidden = torch.randn(4, 8).to(torch.bfloat16)
    back = codec.decode_step(codec.encode_step(StepInput(1, SEGMENTS, hidden_states=hidden)), "torch")
    assert back.hidden_states.dtype == torch.bfloat16
    assert torch.equal(back.hidden_states.view(torch.int16), hidden.view(torch.int16))


def test_a_forwarded_step_keeps_its_segments_and_carries_the_new_hidden_states() -> None:
    request = codec.encode_step(StepInput(3, SEGMENTS, token_ids=np.array([1, 2, 3, 4])))
    forwarded = codec.forward_step(request, torch.ones(4, 2))
    back = codec.decode_step(forwarded, "numpy")
    assert back.segments == SEGMENTS and back.token_ids is None
    assert back.hidden_states.tolist() == [[1.0, 1.0]] * 4


def test_a_result_with_its_timings_comes_back_equal() -> None:
    result = StepResult(5, [SampledToken(7, 42, -0.25)], [StageTiming("w1", 0.5), StageTiming("w2", 0.25)])
    assert codec.decode_result(codec.encode_result(result)) == result


def test_stage_info_comes_back_equal_loaded_or_not() -> None:
    loaded = StageInfo(
        "mini2", "torch", "cpu", "x86_64", 8 << 30, 4 << 30, "demo", LayerRange(2, 4), 6, 3, 1000, "0.1.0", 1
    )
    assert codec.decode_info(codec.encode_info(loaded)) == loaded
    waiting = StageInfo("mini2", "mlx", "metal", "M2", 8 << 30, 4 << 30, "", None, 0, 0, 0, "0.1.0", 1)
    assert codec.decode_info(codec.encode_info(waiting)) == waiting
