"""A stage host: an engine's stage plus the sampler, with the plain operations the stage service serves.

The same host runs a worker's stage (behind `transport.stage_service`) and the coordinator's own stages
(called directly by the pipeline), so a step is computed and sampled by one piece of code everywhere.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from meshllm.devices import Calibration, LayerShape, Precision, StageInfo, describe_host
from meshllm.engines import calibrate, default_engine, guess_device_type, load_stage
from meshllm.engines.base import Stage
from meshllm.errors import StageError
from meshllm.models.checkpoint import Checkpoint
from meshllm.runtime.sampling import Sampler
from meshllm.runtime.weights import WeightCache
from meshllm.step import MalformedStep, StepInput
from meshllm.transport.rpc import PROTOCOL_VERSION, VERSION
from meshllm.transport.stage import Health, LoadSpec, StepOutcome
from meshllm.transport.tls import TlsFiles
from meshllm.transport.weights import WeightsClient

log = logging.getLogger(__name__)

# Without --kv-memory, a stage's KV caches may take this share of the memory free once its weights are in.
KV_MEMORY_SHARE = 0.8


class LocalStageHost:
    """Layers of one checkpoint on this process's engine; samples when it holds the last layers."""

    def __init__(
        self,
        name: str,
        engine: str | None = None,
        device: str | None = None,
        quantize: str | None = None,
        kv_memory: int | float | None = None,
        token: str | None = None,
        tls: TlsFiles | None = None,
        weights_cache: Path | None = None,
    ):
        self.name = name
        # What the KV caches may take: bytes (an int), a share of the memory free after load (a float),
        # or None for KV_MEMORY_SHARE.
        self.own_kv_memory = kv_memory
        self.kv_memory = 0  # of the loaded stage
        # Tokens each live sequence's caches hold, as far as the steps that went through say: a step is
        # checked against it before the engine sees it, so a bad one changes no cache.
        self._held: dict[int, int] = {}
        self.token = token  # the cluster token, for fetching weights from the coordinator
        self.tls = tls  # and the certificates that link takes, like the stage links
        self.weights_cache = WeightCache(weights_cache)
        self.named_engine = engine  # --engine; None: the default for this device and each checkpoint
        self.engine = engine or default_engine(device)
        self.device = device
        self.own_quantize = quantize  # this device's own choice; wins over what Load asks
        self.quantize: str | None = None  # of the loaded stage
        self.stage: Stage | None = None
        self.sampler = Sampler()
        self.model = ""
        self.num_layers = 0
        self._guessed_device_type: str | None = None  # before any load (asking imports the engine once)
        # Compute threads: for a step that shares the machine's cores with other stages' steps, and for
        # one alone in the pipeline (None: as the process was started). See `set_threads`.
        self.threads: int | None = None
        self.threads_alone: int | None = None
        self._threads_now: int | None = None
        # once per precision, volume and layer shape
        self._calibrations: dict[tuple[Precision, int, LayerShape | None], Calibration] = {}

    @classmethod
    def of(
        cls,
        name: str,
        stage: Stage,
        model: str = "",
        num_layers: int = 0,
        quantize: str | None = None,
        kv_memory: int | float | None = None,
    ) -> LocalStageHost:
        """A host around a stage loaded already."""
        host = cls(name, engine=stage.engine, kv_memory=kv_memory)
        host.stage, host.model, host.num_layers, host.quantize = stage, model, num_layers, quantize
        host._set_kv_budget(stage)
        return host

    def _set_kv_budget(self, stage: Stage) -> None:
        """What a freshly loaded stage's KV caches may take, kept here and told to the stage."""
        own = self.own_kv_memory
        if isinstance(own, int):
            self.kv_memory = own
        else:
            share = KV_MEMORY_SHARE if own is None else own
            self.kv_memory = int(describe_host(stage.device_type).memory_available * share)
        stage.set_kv_memory(self.kv_memory)

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
            compute=device.compute,
            model=self.model,
            layers=stage.layer_range if stage is not None else None,
            num_layers=self.num_layers,
            live_sequences=stage.live_sequences() if stage is not None else 0,
            weight_bytes=stage.weight_bytes() if stage is not None else 0,
            version=VERSION,
            protocol_version=PROTOCOL_VERSION,
            quantize=(self.quantize or "") if stage is not None else "",
            kv_bytes_per_token=stage.kv_bytes_per_token() if stage is not None else 0,
            kv_memory=self.kv_memory if stage is not None else 0,
        )

    def calibrate(
        self, precision: Precision, volume: int = 0, layer: LayerShape | None = None
    ) -> Calibration:
        """This device's speeds at `precision`, read over about `volume` bytes, and with `layer` what a
        decoder layer of that shape takes (measured once each)."""
        key = (precision, volume, layer)
        if key not in self._calibrations:
            self._calibrations[key] = calibrate(
                self.engine, precision, self.device, self.threads, volume, self.threads_alone, layer
            )
        return self._calibrations[key]

    def health(self) -> Health:
        stage = self.stage
        message = f"layers {stage.layer_range}" if stage is not None else "waiting for Load"
        return Health(model=self.model, message=message)

    def load(
        self,
        spec: LoadSpec,
        progress: Callable[[float], None] | None = None,
        received: Callable[[int, int], None] | None = None,
    ) -> str:
        quantize = self.own_quantize or spec.quantize
        self.stage = None  # free the old range before reading the new one
        self.model = ""
        self._held.clear()
        started = time.perf_counter()
        fetched = ""
        if spec.weights is not None:
            client = WeightsClient(spec.weights.address, self.token, spec.weights.key, self.tls)
            try:
                report = self.weights_cache.take(client, spec.layer_range, received)
            finally:
                client.close()
            fetched = report.describe(spec.layer_range)
            log.info("%s (in %s)", fetched, report.folder)
            checkpoint = Checkpoint.open(report.folder)
        else:
            checkpoint = Checkpoint.open(spec.model)
        engine = spec.engine or self.named_engine or default_engine(self.device, checkpoint)
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
        self._threads_now = None  # a new stage: its threads are set again at its first step
        self.num_layers = checkpoint.config.num_hidden_layers
        self.sampler = Sampler()
        self._set_kv_budget(stage)
        summary = f"layers {spec.layer_range} loaded in {time.perf_counter() - started:.1f} s"
        return f"{summary}; {fetched}" if fetched else summary

    def set_threads(self, threads: int | None, alone: int | None = None) -> None:
        """Compute each step with `threads` CPU threads, or with `alone` when no other step is in flight
        (stages that share a machine split its cores while they all compute, and the one computing may
        take them all while the others wait)."""
        self.threads, self.threads_alone = threads, alone
        self._threads_now = None

    def _apply_threads(self, stage: Stage, step: StepInput) -> None:
        wanted = self.threads_alone if step.alone and self.threads_alone else self.threads
        if wanted and wanted != self._threads_now:
            stage.set_threads(wanted)
            self._threads_now = wanted

    def step(self, step: StepInput) -> StepOutcome:
        stage = self._loaded_stage()
        self._check(stage, step)
        self._apply_threads(stage, step)
        try:
            output = stage.forward(step)
        except Exception:
            # Whatever the engine did to these sequences' caches before failing is unknown: drop them,
            # so they can only start again from position 0. Other sequences are untouched.
            self.release([segment.seq_id for segment in step.segments])
            raise
        for segment in step.segments:
            self._held[segment.seq_id] = segment.start_pos + segment.n_tokens
        if not stage.is_last:
            return StepOutcome(hidden_states=output.hidden_states)
        assert output.logits is not None  # a last stage returns logits
        if not np.isfinite(output.logits).all():
            # Finite but extreme activations can overflow in the layers: no token can be drawn from that.
            self.release([segment.seq_id for segment in step.segments])
            raise MalformedStep(
                f"worker {self.name}: step {step.step_id}: the layers computed NaN or infinite logits "
                "(the activations that came in were out of any model's range)"
            )
        return StepOutcome(tokens=self.sampler.sample(output.segments, output.logits))

    def _check(self, stage: Stage, step: StepInput) -> None:
        """A MalformedStep unless `step` fits this stage's model and what its caches hold (the wire format
        itself is checked by the codec)."""
        config, name = stage.config, f"worker {self.name}: step {step.step_id}"
        for segment in step.segments:
            end = segment.start_pos + segment.n_tokens
            if end > config.max_position_embeddings:
                raise MalformedStep(
                    f"{name}: sequence {segment.seq_id} reaches position {end}, beyond the model's "
                    f"{config.max_position_embeddings}"
                )
            held = self._held.get(segment.seq_id)
            if held is None and segment.start_pos != 0:
                raise MalformedStep(
                    f"{name}: sequence {segment.seq_id} is not known here, and its first step starts at "
                    f"position {segment.start_pos}, not 0"
                )
            if held is not None and segment.start_pos > held:
                raise MalformedStep(
                    f"{name}: sequence {segment.seq_id} steps at position {segment.start_pos}, but its "
                    f"caches hold {held} tokens"
                )
        if stage.is_first:
            ids = step.token_ids
            if ids is None or len(ids) != step.n_tokens:
                raise MalformedStep(f"{name}: the first stage needs one token id per token")
            if len(ids) and not 0 <= int(min(ids)) <= int(max(ids)) < config.vocab_size:
                raise MalformedStep(f"{name}: a token id is outside the vocabulary of {config.vocab_size}")
            return
        hidden = step.hidden_states
        if hidden is None or tuple(hidden.shape) != (step.n_tokens, config.hidden_size):
            shape = None if hidden is None else list(hidden.shape)
            raise MalformedStep(
                f"{name}: hidden states of shape {shape}, not [{step.n_tokens}, {config.hidden_size}]"
            )

    def release(self, seq_ids: list[int]) -> int:
        for seq_id in seq_ids:
            self._held.pop(seq_id, None)
        stage = self.stage
        if stage is None:
            return 0
        stage.release(seq_ids)
        self.sampler.release(seq_ids)
        return stage.live_sequences()

    def close(self) -> None:
        self.stage = None
