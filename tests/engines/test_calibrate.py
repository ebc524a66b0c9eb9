"""Calibration over as many bytes as a machine's stages will read: at least the compute pass's eight
matrices, at most 256, on every engine here."""

from __future__ import annotations

import numpy as np
import pytest

from meshllm.devices import Precision
from meshllm.engines import calibrate
from meshllm.engines.base import COMPUTE_MATRICES, MAX_READ_MATRICES, read_matrices

MATRIX = 2048 * 2048 * 2  # one bfloat16 matrix of the calibration


def test_the_read_pass_covers_the_volume_asked_within_its_bounds() -> None:
    assert read_matrices(0, MATRIX) == COMPUTE_MATRICES
    assert read_matrices(100 * MATRIX + 1, MATRIX) == 101
    assert read_matrices(10**12, MATRIX) == MAX_READ_MATRICES


@pytest.mark.parametrize("engine", ["torch", "ggml"])
def test_a_calibration_over_a_larger_volume_measures_its_speeds_with_both_thread_counts(engine: str) -> None:
    measured = calibrate(engine, Precision("bfloat16", "int8"), threads=1, volume=24 * MATRIX, alone=2)
    figures = [
        measured.read_bandwidth,
        measured.flop_rate,
        measured.alone_read_bandwidth,
        measured.decode_flop_rate,  # 16-token steps over the whole volume
    ]
    assert np.isfinite(figures).all() and min(figures) > 1e8  # the read speed with 2 threads too
