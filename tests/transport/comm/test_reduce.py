"""reduce.py: the working dtype of a reduction, and the last step of each op."""

from __future__ import annotations

import numpy as np
import pytest

from meshllm.transport.comm.reduce import REDUCE_OPS, accumulate, finish, narrow, widen
from meshllm.transport.comm.wire import Payload
from meshllm.transport.tensors import float32_to_bfloat16_bits


def test_16_bit_floats_widen_to_float32_and_narrow_back_rounded_once() -> None:
    values = np.array([1.0, -2.5, 3.2e4], dtype=np.float32)  # exact in both 16-bit types
    bfloat16 = Payload(float32_to_bfloat16_bits(values).tobytes(), (3,), "bfloat16")
    float16 = Payload(values.astype(np.float16).tobytes(), (3,), "float16")

    for payload in [bfloat16, float16]:
        wide = widen(payload)
        assert wide.dtype == np.float32 and wide.tolist() == values.tolist()
        assert narrow(wide, payload.dtype).tobytes() == payload.data


def test_other_dtypes_are_reduced_in_their_own_and_copied_only_when_asked() -> None:
    values = np.arange(4, dtype=np.int64)
    payload = Payload(values.data.cast("B"), (4,), "int64")

    assert np.shares_memory(widen(payload), values)
    assert not np.shares_memory(widen(payload, copy=True), values)
    assert widen(payload).dtype == np.int64


@pytest.mark.parametrize("op", REDUCE_OPS)
def test_each_op_matches_numpy(op: str) -> None:
    inputs = [np.array([3.0, -1.0, 8.0], np.float32), np.array([1.0, 5.0, -8.0], np.float32)]
    total = inputs[0].copy()

    accumulate(total, inputs[1], op)
    finish(total, op, world_size=2)

    expected = {"sum": np.sum, "max": np.max, "min": np.min, "mean": np.mean}[op](inputs, axis=0)
    np.testing.assert_array_equal(total, expected)


def test_the_mean_of_integers_is_the_floor_of_the_mean() -> None:
    total = np.array([7, -7, 6], dtype=np.int64)

    finish(total, "mean", world_size=2)

    assert total.tolist() == [3, -4, 3]
