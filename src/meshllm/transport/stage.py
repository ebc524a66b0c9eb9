"""The stage protocol without gRPC: what a stage host does, and what Load asks of it.

The stage service (`stage_service.py`) serves a `StageHost` over gRPC; the runtime provides the host
(an engine's stage plus the sampler). The stage client (`stage_client.py`) makes the same calls from
the coordinator's side.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from meshllm.defaults import DEFAULT_GROUP_SIZE
from meshllm.devices import Calibration, LayerShape, Precision, StageInfo
from meshllm.step import LayerRange, SampledToken, StepInput


@dataclass(frozen=True)
class WeightsFrom:
    """Where a stage without its own copy of the model takes its share of the weights."""

    address: str  # "host:port" of a Weights service (the coordinator's)
    key: str  # the content key of the checkpoint it serves


@dataclass(frozen=True)
class LoadSpec:
    """What a stage is asked to load."""

    model: str  # a local folder or hub id, as the stage's machine can resolve it
    layer_range: LayerRange
    dtype: str
    engine: str | None = None  # None: the host's own engine
    quantize: str | None = None  # int8 | int4 | None: as stored
    group_size: int = DEFAULT_GROUP_SIZE
    weights: WeightsFrom | None = None  # None: the stage reads `model` itself


@dataclass(frozen=True)
class LoadUpdate:
    """How a load goes, as the coordinator hears it."""

    message: str
    phase: str = "load"  # "fetch": weights arriving over the cluster; "load": tensors being read
    fraction: float = 0.0  # of the phase, 0..1
    bytes_done: int = 0  # received so far (fetch)
    bytes_total: int = 0  # to be received (0: the cache held them all)
    done: bool = False


@dataclass(frozen=True)
class Health:
    model: str  # empty until loaded
    message: str  # one line: what the stage holds, or what it waits for


@dataclass(frozen=True)
class StepOutcome:
    """What one step gives: hidden states for the next stage, or the sampled tokens on the last stage."""

    hidden_states: Any = None  # [T, hidden] in the host's framework; None on the last stage
    tokens: list[SampledToken] | None = None  # the last stage's sampled tokens


class StageHost(Protocol):
    """One stage's plain, blocking operations. The service calls them on one compute thread, in
    arrival order, so a host needs no locks."""

    name: str
    engine: str  # the engine it loads layers on: 'torch', 'mlx' or 'ggml'

    @property
    def framework(self) -> str:
        """The tensor framework of its hidden states: 'torch', 'mlx' or 'numpy' (ggml)."""
        ...

    @property
    def loaded(self) -> bool: ...

    def info(self) -> StageInfo: ...

    def calibrate(
        self, precision: Precision, volume: int = 0, layer: LayerShape | None = None
    ) -> Calibration:
        """Bytes/s this device reads weights at, in that dtype and quantization, over about `volume` bytes
        of them, and its compute rate; with `layer`, what a decoder layer of that shape takes (measured
        once, kept)."""
        ...

    def health(self) -> Health: ...

    def load(
        self,
        spec: LoadSpec,
        progress: Callable[[float], None],
        received: Callable[[int, int], None] | None = None,
    ) -> str:
        """Replace whatever is loaded by `spec`'s layers; `progress(fraction)` as tensors are read,
        `received(bytes_done, bytes_total)` as weights arrive over the cluster. Returns one line on what
        it took (layers, bytes received, seconds)."""
        ...

    def step(self, step: StepInput) -> StepOutcome:
        """Run one step (a StageError when nothing is loaded or the step is malformed)."""
        ...

    def release(self, seq_ids: list[int]) -> int:
        """Drop these sequences' caches and sampler state; returns the sequences still live."""
        ...

    def close(self) -> None: ...
