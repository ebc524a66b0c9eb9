"""The engine a stage runs where none is named, on this machine (Linux, a CPU, ggml-python installed)."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from pathlib import Path

import pytest

from meshllm.engines import default_engine
from meshllm.models.checkpoint import Checkpoint
from meshllm.models.gguf import write_gguf


def test_a_cpu_runs_ggml_and_a_named_gpu_runs_torch() -> None:
    pytest.importorskip("ggml")
    assert default_engine() == default_engine("auto") == default_engine("cpu") == "ggml"
    assert default_engine("cuda") == default_engine("cuda:1") == default_engine("mps") == "torch"


def test_the_checkpoint_decides_where_only_one_engine_reads_it(
    tiny_checkpoint: Callable[..., Path], tmp_path: Path
) -> None:
    folder = tiny_checkpoint("qwen3")
    assert default_engine(checkpoint=Checkpoint.open(str(folder))) == "ggml"
    # a GGUF file: only ggml reads it, whatever the device says
    gguf = write_gguf(folder, tmp_path / "model.gguf")
    assert default_engine("cuda", Checkpoint.open(str(gguf))) == "ggml"
    # quantized by MLX: ggml does not read it, torch does
    pytest.importorskip("mlx.core")
    convert = pytest.importorskip("mlx_lm.convert").convert
    with contextlib.redirect_stdout(io.StringIO()):
        convert(str(folder), str(tmp_path / "mlx-4bit"), quantize=True, q_bits=4, q_group_size=32)
    assert default_engine("cpu", Checkpoint.open(str(tmp_path / "mlx-4bit"))) == "torch"
