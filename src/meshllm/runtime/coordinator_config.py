"""Everything a coordinator is started with, in one frozen object."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from meshllm.defaults import AUTO_DTYPE, COORDINATOR_STAGE, DEFAULT_GROUP_SIZE, QUANTIZE_MODES, SHARED_STAGES
from meshllm.errors import ConfigError
from meshllm.transport.tls import TlsFiles


@dataclass(frozen=True)
class WorkerAddress:
    name: str
    address: str  # "host:port" the coordinator (and the previous stage) dials


@dataclass(frozen=True)
class CoordinatorConfig:
    model: str  # a local folder, a hub id, or "demo"
    workers: tuple[WorkerAddress, ...] = ()  # in chain order, after the coordinator's own stage
    local_stage: bool = True  # the coordinator computes the first layers itself
    dtype: str = AUTO_DTYPE  # or float32, bfloat16, float16; "auto": the checkpoint's own (`own_dtype`)
    quantize: str | None = None  # int8 | int4: every device's linear layers held quantized
    group_size: int = DEFAULT_GROUP_SIZE  # int4's group of inputs
    device_quantize: Mapping[str, str | None] = field(default_factory=dict)  # a device's own choice
    engine: str | None = None  # None: this machine's best (`engines.default_engine`)
    device: str | None = None  # the local stage's torch device (None: cuda, then mps, then cpu)
    token: str | None = None  # the cluster token every gRPC call carries
    tls: TlsFiles | None = None  # this device's certificates: mutual TLS to every worker; None: plaintext
    name: str = COORDINATOR_STAGE  # this device's name in the plan, logs and /distributed/gpu-info
    memory_overrides: Mapping[str, int] = field(default_factory=dict)  # bytes the plan may use, by device
    layer_overrides: Mapping[str, tuple[int, int]] = field(default_factory=dict)  # fixed ranges, by device
    step_timeout: float = 30.0  # seconds a pipeline step may take before its sequences fail
    # Seconds sequences whose stage was lost wait for the pipeline to be whole again (a worker started
    # again and reloaded), to be prefilled again and go on; then they end with an error.
    replay_timeout: float = 60.0
    # Seconds a worker may stay unreachable before its layers are planned over the other devices (when
    # they have the memory); None: never, the cluster waits for it.
    replan_after: float | None = 20.0
    monitor_interval: float = 1.0  # seconds between two looks at every device
    max_step_tokens: int = 512
    max_running: int = 128  # sequences holding KV caches at once; later ones wait
    # What the local stage's KV caches may take: bytes (an int), a share of the memory free after its
    # weights are loaded (a float), or None: 80% of it.
    kv_memory: int | float | None = None
    # The local stage's compute threads, and those of a step alone in the pipeline (LocalStageHost.
    # set_threads); None: as the process was started.
    threads: int | None = None
    threads_alone: int | None = None
    # How stages that share a compute unit (one machine's cores, `devices.compute_unit`) run: "turns",
    # one step in flight per unit; "together", one per stage, computing at once; "auto", whichever the
    # start's prediction says is faster ("together" where nothing was predicted).
    shared_stages: str = SHARED_STAGES[0]
    # "host:port" where the coordinator serves the checkpoint's weights to workers without their own copy;
    # None: every worker reads `model` itself.
    weights_listen: str | None = None
    weights_address: str | None = None  # what the workers dial for them; None: weights_listen
    device_models: Mapping[str, str] = field(default_factory=dict)  # a worker's own copy: its path there

    def __post_init__(self) -> None:
        object.__setattr__(self, "workers", tuple(self.workers))
        if not self.local_stage and not self.workers:
            raise ConfigError("the coordinator computes nothing (--no-local-stage) and has no workers")
        names = [self.name] * self.local_stage + [worker.name for worker in self.workers]
        if len(set(names)) != len(names):
            raise ConfigError(f"device names must be unique, got {', '.join(names)}")
        for name, mode in [("quantize", self.quantize), *self.device_quantize.items()]:
            if mode is not None and mode not in QUANTIZE_MODES:
                raise ConfigError(f"{name}: {mode!r} is not one of {', '.join(QUANTIZE_MODES)}")
        if self.group_size < 1:
            raise ConfigError(f"the quantization group size must be positive, got {self.group_size}")
        if self.shared_stages not in SHARED_STAGES:
            raise ConfigError(
                f"shared_stages: {self.shared_stages!r} is not one of {', '.join(SHARED_STAGES)}"
            )
        if self.replay_timeout < 0:
            raise ConfigError(f"the replay timeout must not be negative, got {self.replay_timeout}")
        if self.replan_after is not None and self.replan_after < 0:
            raise ConfigError(f"the re-plan delay must not be negative, got {self.replan_after}")
        if self.kv_memory is not None and not (
            self.kv_memory > 0 and (isinstance(self.kv_memory, int) or self.kv_memory <= 1)
        ):
            raise ConfigError(f"the KV memory must be positive, got {self.kv_memory}")
        unknown = sorted(set(self.device_models) - {worker.name for worker in self.workers})
        if unknown:
            raise ConfigError(f"a model path is given for {', '.join(unknown)}, which is no worker")
        if self.step_timeout <= 0:
            raise ConfigError(f"the step timeout must be positive, got {self.step_timeout}")

    def weights_of(self, device: str) -> str | None:
        """The address `device` takes its weights from, or None when it reads a copy of its own."""
        if device in self.device_models or self.weights_listen is None:
            return None
        return self.weights_address or self.weights_listen

    def model_of(self, device: str) -> str:
        """The model as `device` names it: its own copy's path, else the cluster's reference."""
        return self.device_models.get(device, self.model)

    def quantize_of(self, device: str) -> str | None:
        """How `device` holds its weights: its own setting, else the cluster's."""
        return self.device_quantize[device] if device in self.device_quantize else self.quantize

    @property
    def device_names(self) -> list[str]:
        """Every device of the plan, in chain order."""
        return [self.name] * self.local_stage + [worker.name for worker in self.workers]
