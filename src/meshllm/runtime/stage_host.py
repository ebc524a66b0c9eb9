"""A stage host: an engine's stage plus the sampler, with the plain operations the stage service serves.

The same host runs a worker's stage (behind `transport.stage_service`) and the coordinator's own stages
(called directly by the pipeline), so a step is computed and sampled by one piece of code everywhere.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from meshllm.devices import StageInfo, describe_host
from meshllm.engines import default_engine, guess_device_type, load_stage, read_bandwidth
from meshllm.engines.base import Stage
from meshllm.errors import StageError
from meshllm.models.checkpoint import Checkpoint
from meshllm.runtime.sampling import Sampler
from meshllm.step import StepInput
from meshllm.transport.rpc import PROTOCOL_VERSION, VERSION
from meshllm.transport.stage import Health, LoadSpec, StepOutcome

log = logging.getLogger(__name__)


class LocalStageHost:
    """Layers of one checkpoint on this process's engine; samples when it holds the last layers."""

    def __init__(
        self, name: str, engine: str | None = None, device: str | None = None, quantize: str | None = None
    ):
        self.name = name
        self.engine = engine or default_engine()
        self.device = device
        self.own_quantize = quantize  # this device's own choice; wins over what Load asks
        self.quantize: str | None = None  # of the loaded stage
        self.stage: Stage | None = None
        self.sampler = Sampler()
        self.model = ""
        self.num_layers = 0
        self._guessed_device_type: str | None = None  # before any load (asking imports the engine once)
        self._bandwidths: dict[tuple[str, str | None, int], float] = {}  # measured read speeds

    @classmethod
    def of(
        cls, name: str, stage: Stage, model: str = "", num_layers: int = 0, quantize: str | None = None
    ) -> LocalStageHost:
        """A host around a stage loaded already."""
        host = cls(name, engine=stage.engine)
        host.stage, host.model, host.num_layers, host.quantize = stage, model, num_layers, quantize
        return host

    @property
    def framework(self) -> str:
        """The array type this stage takes hidden states in: the ggml engine's are numpy arrays."""
        return "numpy" if self.engine == "ggml" else self.engine

    @property
    def loaded(self) -> bool:
        return self.stage is not None

    def _loaded_stage(self) -> Stage:
        if self.stage is None:
            raise StageError(f"worker {self.name}: no layers loaded yet")
        return self.stage

    def info(self) -> StageInfo:
        stage = self.stage
        if stage is not None:
            device_type = stage.device_type
        else:
            if self._guessed_device_type is None:
                self._guessed_device_type = guess_device_type(self.engine, self.device)
            device_type = self._guessed_device_type
        device = describe_host(device_type)
        return StageInfo(
            hostname=device.hostname,
            engine=self.engine,
            device_type=device_type,
            device_name=device.device_name,
            memory_total=device.memory_total,
            memory_available=device.memory_available,
            model=self.model,
            layers=stage.layer_range if stage is not None else None,
            num_layers=self.num_layers,
            live_sequences=stage.live_sequences() if stage is not None else 0,
            weight_bytes=stage.weight_bytes() if stage is not None else 0,
            version=VERSION,
            protocol_version=PROTOCOL_VERSION,
            quantize=(self.quantize or "") if stage is not None else "",
        )

    def calibrate(self, dtype: str, quantize: str | None, group_size: int) -> float:
        key = (dtype, quantize, group_size)
        if key not in self._bandwidths:
            self._bandwidths[key] = read_bandwidth(self.engine, dtype, quantize, group_size, self.device)
        return self._bandwidths[key]

    def health(self) -> Health:
        stage = self.stage
        message = f"layers {stage.layer_range}" if stage is not None else "waiting for Load"
        return Health(model=self.model, message=message)

    def load(self, spec: LoadSpec, progress: Callable[[float], None] | None = None) -> None:
        engine = spec.engine or self.engine
        quantize = self.own_quantize or spec.quantize
        self.stage = None  # free the old range before reading the new one
        self.model = ""
        checkpoint = Checkpoint.open(spec.model)
        stage = load_stage(
            engine,
            checkpoint,
            spec.layer_range,
            dtype=spec.dtype,
            device=self.device,
            progress=progress,
            quantize=quantize,
            group_size=spec.group_size,
        )
        self.stage, self.engine, self.model, self.quantize = stage, engine, spec.model, quantize
        self.num_layers = checkpoint.config.num_hidden_layers
        self.sampler = Sampler()

    def step(self, step: StepInput) -> StepOutcome:
        stage = self._loaded_stage()
        output = stage.forward(step)
        if not stage.is_last:
            return StepOutcome(hidden_states=output.hidden_states)
        assert output.logits is not None  # a last stage returns logits
        return StepOutcome(tokens=self.sampler.sample(output.segments, output.logits))

    def release(self, seq_ids: list[int]) -> int:
        stage = self.stage
        if stage is None:
            return 0
        stage.release(seq_ids)
        self.sampler.release(seq_ids)
        return stage.live_sequences()

    def close(self) -> None:
        self.stage = None
