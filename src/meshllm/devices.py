"""What a device is and how it is doing: one model for the runtime, the API and `cluster status`.

`HostDevice` is what this machine has (asked locally); `StageInfo` is what a stage reports about itself
(over the wire, from a worker's Info); `DeviceStatus` is one device of a running cluster as the
coordinator sees it: the rows of `/distributed/gpu-info`, which `cluster status` parses back.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import socket
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

from pydantic import BaseModel, ConfigDict

from meshllm.defaults import DEFAULT_GROUP_SIZE
from meshllm.step import LayerRange

Status = Literal["healthy", "unreachable", "not loaded", "error"]
Role = Literal["coordinator", "worker"]


class DeviceStatus(BaseModel):
    """One device of the cluster as the coordinator sees it, first stage first."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    device_id: int  # the stage index: 0 is the first stage
    name: str
    hostname: str
    address: str  # "host:port" for a worker, "local" for the coordinator's own stage
    role: Role
    status: Status
    engine: str
    device_type: str  # cpu | cuda | mps | metal
    memory_total: int  # bytes
    memory_available: int
    weight_bytes: int
    layers: LayerRange
    live_sequences: int
    rtt_ms: float | None
    version: str
    error: str = ""
    quantize: str = ""  # how its weights are held: int8 | int4 | "" (as stored)
    in_plan: bool = True  # False: left out of the layer plan (it stayed down); the others run its layers

    @property
    def healthy(self) -> bool:
        return self.status == "healthy"

    def problem(self) -> str:
        """One line saying what is wrong with the device (empty when healthy)."""
        if self.healthy:
            return ""
        return self.error or f"device '{self.name}' ({self.address}) is {self.status}"


@dataclass(frozen=True)
class HostDevice:
    """The accelerator (or CPU) of this machine that an engine computes on, and its memory."""

    hostname: str
    device_type: str  # cpu | cuda | mps | metal
    device_name: str
    memory_total: int  # bytes
    memory_available: int
    compute: str = ""  # what its arithmetic runs on (`compute_unit`): stages of one unit take turns


class Precision(NamedTuple):
    """How a stage holds its weights: the dtype, and int8/int4 for its linear layers (None: as stored)."""

    dtype: str
    quantize: str | None = None
    group_size: int = DEFAULT_GROUP_SIZE


class Calibration(NamedTuple):
    """How fast a device runs decode's two costs: reading weights, and arithmetic over a batch of tokens."""

    read_bandwidth: float  # bytes/s of weights read by one-token matmuls
    flop_rate: float  # floating-point operations/s of matmuls over a batch of tokens
    # The read speed of a step alone in the pipeline, where it takes more threads (0: read_bandwidth).
    alone_read_bandwidth: float = 0.0
    # Operations/s that a decode step of many streams adds to reading the weights: DECODE_BATCH tokens
    # over weights streamed from memory, not cached (0: flop_rate). Lower than flop_rate on a CPU.
    decode_flop_rate: float = 0.0
    # Timed on decoder layers of the model's own shape (0: not timed, the matmul rates stand in): the
    # seconds each token of a decode step past the first adds to one layer (its arithmetic, its attention
    # over its sequence's cache, the small operations around them), one prompt token's seconds in one, and a
    # one-token step's seconds in one with its weights close by and the threads of a step alone.
    layer_token_seconds: float = 0.0
    layer_prompt_seconds: float = 0.0
    layer_step_seconds: float = 0.0
    # What each decode token past the first adds to one layer with the threads of a step alone (0: not
    # timed, or the same threads): where stages on the same cores take turns, every step is alone.
    layer_token_seconds_alone: float = 0.0


class LayerShape(NamedTuple):
    """A model's decoder layer as a calibration builds one to time: its shape, and the tokens of context
    each sequence has cached when its decode steps are timed."""

    model_type: str  # llama | mistral | qwen2 | qwen3
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    context: int


class Link(NamedTuple):
    """A link between two processes, as measured: what an empty call and a bulk transfer take."""

    round_trip: float  # seconds
    bandwidth: float  # bytes/s one way

    def seconds(self, payload: int) -> float:
        """One step's cost on this link: there and back, with `payload` bytes of activations."""
        return self.round_trip + payload / self.bandwidth if self.bandwidth > 0 else self.round_trip


@dataclass(frozen=True)
class StageInfo:
    """What a stage says about itself: its machine, what it has loaded, and its version."""

    hostname: str
    engine: str
    device_type: str
    device_name: str
    memory_total: int
    memory_available: int
    model: str  # empty until loaded
    layers: LayerRange | None  # None until loaded
    num_layers: int  # of the whole model, 0 until loaded
    live_sequences: int
    weight_bytes: int
    version: str
    protocol_version: int
    quantize: str = ""  # int8 | int4 | "" (the weights as stored)
    kv_bytes_per_token: int = 0  # what one token of one sequence adds to its KV caches; 0 until loaded
    kv_memory: int = 0  # bytes its KV caches may take (its --kv-memory, or a share of free memory at load)
    step_port: int = 0  # the port of its host taking step links (transport/step_link.py); 0: none
    step_socket: str = ""  # the local socket taking them from its machine (frames.local_listener)
    calibration: Calibration | None = None  # the device's speeds, when the Info call asked for them
    compute: str = ""  # what its arithmetic runs on (`compute_unit`); "" from a worker that does not say


def system_memory() -> tuple[int, int]:
    """(total, available) bytes of system memory."""
    try:
        with open("/proc/meminfo") as handle:
            fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in handle}
        return fields["MemTotal"], fields.get("MemAvailable", fields["MemFree"])
    except OSError:
        pass
    try:  # macOS
        total = int(subprocess.run(["sysctl", "-n", "hw.memsize"], capture_output=True, text=True).stdout)
        return total, int(total * 0.75)
    except (OSError, ValueError):
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return pages, pages // 2


def describe_host(device_type: str) -> HostDevice:
    """Memory of the accelerator of `device_type` (system memory for cpu, mps and metal)."""
    total, available = system_memory()
    name = platform.processor() or platform.machine() or "cpu"
    if device_type == "cuda":
        import torch

        available, total = torch.cuda.mem_get_info()
        name = torch.cuda.get_device_name()
    return HostDevice(socket.gethostname(), device_type, name, total, available, compute_unit(device_type))


def compute_unit(device_type: str) -> str:
    """What a stage of `device_type` in this process computes on, as a name two processes agree on
    when they share it: this machine's CPU cores the process may run on (its affinity), its GPU as a
    whole on a Mac (mps and metal: one GPU, and memory shared with the CPU), or one CUDA device (its
    UUID, whatever CUDA_VISIBLE_DEVICES numbers it). Stages on one unit computing at the same time
    split its cores and its memory's bandwidth: by default they take turns, the pipeline keeping one
    step in flight per unit (`steps_in_flight`)."""
    machine = _machine()
    if device_type == "cuda":
        import torch

        properties = torch.cuda.get_device_properties(torch.cuda.current_device())
        return f"{machine}/cuda/{getattr(properties, 'uuid', '') or torch.cuda.current_device()}"
    if device_type in ("mps", "metal"):
        return f"{machine}/gpu"
    try:
        cores = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux: every process may run on every core
        return f"{machine}/cpu"
    return f"{machine}/cpu/{format_cores(cores)}"


def steps_in_flight(units: list[str]) -> int:
    """How many steps a pipeline over stages computing on `units` (in chain order; "" where unknown,
    counted as a unit of its own) keeps in flight: one per unit, so that every unit has a step to
    work on and no two steps split one unit's cores."""
    return max(1, len({unit or f"stage {index}" for index, unit in enumerate(units)}))


def parse_cores(text: str) -> frozenset[int]:
    """'0-3,8' -> {0, 1, 2, 3, 8}: CPU cores to run on; a ValueError saying what is wrong."""
    cores: set[int] = set()
    for part in str(text).split(","):
        first, _, last = part.strip().partition("-")
        try:
            low, high = int(first), int(last or first)
        except ValueError:
            raise ValueError(f"{text!r} is not a list of cores such as 0-3 or 0-3,8-11") from None
        if low < 0 or high < low:
            raise ValueError(f"{part.strip()!r} in {text!r} is not a range of cores")
        cores.update(range(low, high + 1))
    return frozenset(cores)


def format_cores(cores: Iterable[int]) -> str:
    """ "0-3,6" for {0, 1, 2, 3, 6}: what `parse_cores` reads."""
    spans: list[list[int]] = []
    for number in sorted(cores):
        if spans and spans[-1][1] == number - 1:
            spans[-1][1] = number
        else:
            spans.append([number, number])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


@functools.cache
def _machine() -> str:
    """This machine, the same in every process on it and different on another: a digest of its
    machine id (which should not leave the machine as it is), else of its host name."""
    found = ""
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            found = Path(path).read_text().strip()
        except OSError:
            continue
        if found:
            break
    if not found and platform.system() == "Darwin":
        try:
            found = subprocess.run(
                ["sysctl", "-n", "kern.uuid"], capture_output=True, text=True, timeout=5
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            found = ""
    found = found or socket.gethostname()
    return hashlib.sha256(f"meshllm machine {found}".encode()).hexdigest()[:16]


class WorkerExit(BaseModel):
    """One exit of a supervised worker: how it ended and the last lines it wrote."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    pid: int
    how: str  # "status 1" | "signal SIGKILL"
    at: float  # wall-clock seconds
    log_tail: list[str] = []


class SupervisorReport(BaseModel):
    """What `meshllm supervise` writes to its status file after every change, for `cluster status`
    and the coordinator: is the worker running, how often it exited, and how it last did."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    supervisor_pid: int
    worker_pid: int | None  # None while it waits to start the worker again
    state: Literal["running", "waiting", "stopped"]
    exits: int = 0  # exits since the supervisor started
    last_exit: WorkerExit | None = None
    next_start_at: float | None = None  # wall-clock seconds, while waiting
    updated_at: float = 0.0

    def problem(self) -> str:
        """One line about the worker's last exit (empty when it never exited)."""
        if self.last_exit is None:
            return ""
        last = self.last_exit
        line = next((text for text in reversed(last.log_tail) if text.strip()), "")
        times = "once" if self.exits == 1 else f"{self.exits} times"
        text = f"device '{self.name}': the worker exited {times}, last with {last.how} (pid {last.pid})"
        if self.state == "waiting" and self.next_start_at is not None:
            text += f"; started again in {max(0.0, self.next_start_at - time.time()):.0f} s"
        return text + (f"; its last line: {line.strip()}" if line else "")
