"""The engine protocol: what every engine (torch, mlx) offers the runtime.

A stage owns the half-open range of decoder layers `[start, end)` of one checkpoint (see `meshllm.step`
for the step and segment types it computes on). Loading takes typed options only: an option an engine
does not know is a TypeError, never silently dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from meshllm.defaults import QUANTIZE_MODES
from meshllm.errors import ConfigError
from meshllm.models.checkpoint import Checkpoint
from meshllm.models.config import ModelConfig
from meshllm.step import LayerRange, StepInput, StepOutput

Progress = Callable[[float], None]  # fraction of the stage's tensors read so far, 0..1


class Stage(Protocol):
    """Layers `[start, end)` of one checkpoint, with a KV cache per live sequence."""

    engine: str  # "torch" | "mlx" | "ggml"
    config: ModelConfig  # of the whole model
    layer_range: LayerRange
    is_first: bool
    is_last: bool

    @property
    def device_type(self) -> str:
        """Where the weights live: cpu | cuda | mps | metal."""
        ...

    def forward(self, step: StepInput) -> StepOutput: ...

    def release(self, seq_ids: list[int]) -> None:
        """Drop the KV caches of these sequences; unknown ids are ignored."""

    def set_threads(self, threads: int) -> None:
        """Compute the steps that follow with this many CPU threads (where the engine computes on them)."""

    def set_kv_memory(self, nbytes: int) -> None:
        """What the KV caches may take (the coordinator admits sequences within it): an engine that
        allocates caches ahead of need keeps that within it too."""

    def live_sequences(self) -> int: ...

    def weight_bytes(self) -> int:
        """Bytes of parameters this stage holds."""
        ...

    def kv_bytes_per_token(self) -> int:
        """Bytes one token of one sequence adds to this stage's KV caches (keys and values, every layer)."""
        ...


class LoadStage(Protocol):
    """Each engine's `load_stage`: build layers `[start, end)` of `checkpoint`, reading only their tensors."""

    def __call__(
        self,
        checkpoint: Checkpoint | str,
        layer_range: tuple[int, int],
        *,
        dtype: str = ...,
        device: str | None = ...,
        progress: Progress | None = ...,
        quantize: str | None = ...,
        group_size: int = ...,
    ) -> Stage: ...


@dataclass(frozen=True)
class StageBounds:
    """A checked request for a stage: the open checkpoint and where the range sits in the model."""

    checkpoint: Checkpoint
    layer_range: LayerRange
    is_first: bool
    is_last: bool


def stage_bounds(
    checkpoint: Checkpoint | str,
    layer_range: tuple[int, int],
    dtype: str,
    dtypes: Iterable[str],
    quantize: str | None = None,
    reads_gguf: bool = False,
) -> StageBounds:
    """Open `checkpoint` (a Checkpoint or a reference), check the range, the dtype an engine offers, the
    quantization mode, and that the engine reads the checkpoint's format."""
    if quantize is not None and quantize not in QUANTIZE_MODES:
        raise ConfigError(f"quantize {quantize!r} is not one of {', '.join(QUANTIZE_MODES)}")
    if not isinstance(checkpoint, Checkpoint):
        checkpoint = Checkpoint.open(checkpoint)
    if checkpoint.gguf is not None and not reads_gguf:
        raise ConfigError(f"{checkpoint.path}: a GGUF file is read by the ggml engine only (--engine ggml)")
    num_layers = checkpoint.config.num_hidden_layers
    checked = LayerRange.checked(layer_range, num_layers)
    dtypes = list(dtypes)
    if dtype not in dtypes:
        raise ConfigError(f"dtype {dtype!r} is not one of {', '.join(dtypes)}")
    return StageBounds(checkpoint, checked, checked.is_first, checked.is_last(num_layers))


# Calibration (each engine's `calibrate`): the compute rate is measured over a few matrices that stay in a
# cache; the read speed over as many bytes as the stages of this machine will hold (`volume`), since a
# model that fits the last-level cache (480 MB on some servers) reads at its speed, one that does not at
# the memory's.
COMPUTE_MATRICES = 8
DECODE_BATCH = 16  # tokens of the decode step the calibration times over the whole volume: 16 streams
MAX_READ_MATRICES = 256


def added_rate(tokens: int, weights: int, one: float, many: float) -> float:
    """Operations/s of what a `tokens`-token pass over `weights` weights took beyond a one-token pass
    over the same (`one` and `many` seconds): the pass reads the weights too, so what it takes beyond
    the one-token pass is its further tokens' arithmetic (at least a tenth of it, against noise)."""
    return 2 * (tokens - 1) * weights / max(many - one, many * 0.1)


def read_matrices(volume: int, matrix_bytes: int) -> int:
    """How many matrices of `matrix_bytes` the read-speed pass goes over to read about `volume` bytes."""
    wanted = -(-max(volume, 0) // max(matrix_bytes, 1))
    return max(COMPUTE_MATRICES, min(MAX_READ_MATRICES, wanted))
