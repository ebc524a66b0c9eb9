"""Engines run a stage's layers. `load_stage` picks one by name; each lives in its own sub-package."""

from __future__ import annotations

import importlib
import importlib.util
import logging
import platform
import sys

from meshllm.defaults import DEFAULT_GROUP_SIZE, ENGINES
from meshllm.devices import Calibration, LayerShape, Precision
from meshllm.engines.base import LoadStage, Progress, Stage
from meshllm.engines.layer_timing import time_layers
from meshllm.errors import ConfigError
from meshllm.models.checkpoint import Checkpoint

log = logging.getLogger(__name__)


def default_engine(device: str | None = None, checkpoint: Checkpoint | None = None) -> str:
    """The engine a stage runs where none is named: mlx on Apple silicon; torch on a GPU (`device` names
    one, or, for None and "auto", torch finds CUDA or MPS); on a CPU ggml, llama.cpp's kernels, which
    decode 2-2.5x faster than torch's there (docs/benchmarks.md), where ggml-python is installed; else
    torch. Where the `checkpoint` is known: ggml for a GGUF file (no other engine reads one), and not
    ggml for a checkpoint quantized by MLX (which ggml does not read)."""
    if checkpoint is not None and checkpoint.gguf is not None:
        return "ggml"
    if sys.platform == "darwin" and platform.machine() == "arm64":
        try:
            importlib.import_module("mlx.core")
            return "mlx"
        except ImportError:
            pass
    if device not in (None, "auto", "cpu") or importlib.util.find_spec("ggml") is None:
        return "torch"
    if checkpoint is not None and checkpoint.config.quantization:
        return "torch"
    if device != "cpu":
        from meshllm.engines.torch.stage import pick_device

        if pick_device(device).type != "cpu":
            return "torch"
    return "ggml"


def engine_loader(engine: str) -> LoadStage:
    """The `load_stage` of `engine` ('torch', 'mlx' or 'ggml'); a ConfigError naming the fix when it is missing."""
    if engine not in ENGINES:
        raise ConfigError(f"engine {engine!r} is not one of {', '.join(ENGINES)}")
    try:
        module = importlib.import_module(f"meshllm.engines.{engine}")
    except ImportError as error:
        raise ConfigError(
            f"engine {engine!r} is not installed here ({error}); pip install 'meshllm[{engine}]'"
        ) from None
    return module.load_stage  # type: ignore[no-any-return]


def load_stage(
    engine: str,
    checkpoint: Checkpoint | str,
    layer_range: tuple[int, int],
    *,
    dtype: str = "float32",
    device: str | None = None,
    progress: Progress | None = None,
    quantize: str | None = None,
    group_size: int = DEFAULT_GROUP_SIZE,
) -> Stage:
    """Load layers `[start, end)` of `checkpoint` on `engine` ('torch', 'mlx' or 'ggml'), its linear layers held
    quantized when `quantize` is 'int8' or 'int4'."""
    loader = engine_loader(engine)
    return loader(
        checkpoint,
        layer_range,
        dtype=dtype,
        device=device,
        progress=progress,
        quantize=quantize,
        group_size=group_size,
    )


def calibrate(
    engine: str,
    precision: Precision,
    device: str | None = None,
    threads: int | None = None,
    volume: int = 0,
    alone: int | None = None,
    layer: LayerShape | None = None,
) -> Calibration:
    """How fast this device reads weights as decode does and computes over a batch of tokens, on `engine`
    at `precision` (a short measurement, a second or two), with `threads` CPU threads (None: the
    process's); the read speed over about `volume` bytes of weights (at least 8 matrices of 2048²), and
    with `alone` threads too (`alone_read_bandwidth`; MLX chooses its threads itself). With `layer`, also
    what a decode token and a prompt token cost in a decoder layer of that shape (`layer_timing`)."""
    calibration = _matmul_calibration(engine, precision, device, threads, volume, alone)
    if layer is None:
        return calibration
    try:
        timed = time_layers(engine, layer, precision, device, threads, alone)
    except Exception as error:  # the layers are only timed: what a load would say, it says then
        log.warning("no layer of the model's shape could be timed here (%s): predicting from matmuls", error)
        return calibration
    return calibration._replace(
        layer_token_seconds=timed.token,
        layer_prompt_seconds=timed.prompt,
        layer_step_seconds=timed.step,
        layer_token_seconds_alone=timed.token_alone,
    )


def _matmul_calibration(
    engine: str, precision: Precision, device: str | None, threads: int | None, volume: int, alone: int | None
) -> Calibration:
    if engine == "torch":
        from meshllm.engines.torch.calibrate import calibrate as torch_calibrate

        return torch_calibrate(precision, device, threads, volume, alone)
    engine_loader(engine)  # a clear error when the engine is missing
    if engine == "ggml":
        from meshllm.engines.ggml.stage import calibrate as ggml_calibrate

        return ggml_calibrate(precision, device, threads, volume, alone)
    from meshllm.engines.mlx.stage import calibrate as mlx_calibrate

    return mlx_calibrate(precision, device, volume)


def guess_device_type(engine: str, device: str | None) -> str:
    """The device type a stage of `engine` would compute on, asked before any stage is loaded."""
    if engine == "mlx":
        return "metal" if default_engine() == "mlx" else "cpu"
    if engine == "ggml":
        return "cpu"
    if device and device != "auto":
        return device.split(":")[0]
    from meshllm.engines.torch.stage import pick_device

    return pick_device(device).type
