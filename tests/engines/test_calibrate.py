"""Calibration over as many bytes as a machine's stages will read: at least the compute pass's eight
matrices, at most 256, on every engine here; and decoder layers of a model's shape, timed."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors import safe_open

from meshllm.devices import LayerShape, Precision
from meshllm.engines import calibrate
from meshllm.engines.base import COMPUTE_MATRICES, MAX_READ_MATRICES, read_matrices
from meshllm.models.checkpoint import Checkpoint
from meshllm.models.tiny import layer_checkpoint

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


SMALL_LAYER = LayerShape("qwen3", 256, 768, 8, 4, 32, context=48)


@pytest.mark.parametrize("engine", ["torch", "ggml", "mlx"])
def test_a_layer_of_the_models_shape_is_timed_on_every_engine(engine: str) -> None:
    """Two random layers of the shape asked, loaded as the engine loads a stage: a decode token past the
    first, a prompt token and a one-token step each take some time in a layer; without a shape nothing
    is timed."""
    measured = calibrate(engine, Precision("float32"), threads=1, layer=SMALL_LAYER)
    timed = [measured.layer_token_seconds, measured.layer_prompt_seconds, measured.layer_step_seconds]
    assert 0 < min(timed) and max(timed) < 0.1
    assert calibrate(engine, Precision("float32"), threads=1).layer_token_seconds == 0.0


@pytest.mark.parametrize("engine", ["torch", "ggml"])
def test_a_decode_token_is_timed_again_on_the_threads_of_a_step_alone_where_they_differ(engine: str) -> None:
    measured = calibrate(engine, Precision("float32"), threads=1, layer=SMALL_LAYER, alone=2)
    assert 0 < measured.layer_token_seconds_alone < 0.1
    same = calibrate(engine, Precision("float32"), threads=1, layer=SMALL_LAYER, alone=1)
    assert same.layer_token_seconds > 0 and same.layer_token_seconds_alone == 0.0  # nothing more to time


def test_a_wider_layer_takes_longer_per_token() -> None:
    narrow = calibrate("ggml", Precision("float32"), threads=1, layer=SMALL_LAYER)
    wide = calibrate(
        "ggml",
        Precision("float32"),
        threads=1,
        layer=SMALL_LAYER._replace(hidden_size=1024, intermediate_size=3072, head_dim=128),
    )
    assert wide.layer_prompt_seconds > 2 * narrow.layer_prompt_seconds
    assert wide.layer_token_seconds > narrow.layer_token_seconds


def test_the_timed_layers_are_of_the_shape_asked_with_a_small_vocabulary(tmp_path) -> None:
    checkpoint = Checkpoint.open(layer_checkpoint(tmp_path, SMALL_LAYER, layers=2))
    config = checkpoint.config
    assert config.layer_shape(SMALL_LAYER.context) == SMALL_LAYER
    assert config.num_hidden_layers == 2 and config.vocab_size == 64
    with safe_open(checkpoint.weight_map["model.layers.1.mlp.down_proj.weight"], "numpy") as tensors:
        assert tensors.get_slice("model.layers.1.mlp.down_proj.weight").get_shape() == [256, 768]


def test_a_layer_the_engine_cannot_hold_leaves_the_matmul_figures_and_says_why(caplog) -> None:
    """Rows of 100 weights fit no q8_0 block of 32: a load of such a model fails, and says so then; its
    calibration only warns."""
    odd = LayerShape("qwen3", 100, 200, 4, 2, 25, context=16)
    measured = calibrate("ggml", Precision("bfloat16", "int8"), threads=1, layer=odd)
    assert measured.read_bandwidth > 0 and measured.layer_token_seconds == 0.0
    assert "no layer of the model's shape could be timed here" in caplog.text
    assert "cannot be held in ggml blocks of 32" in caplog.text
