"""`meshllm cluster status`: one row per device, from the pid files (does the process run?), each worker's
gRPC Info (does it answer, what has it loaded?) and the coordinator's /distributed/gpu-info (the plan,
each device's status as the coordinator sees it, round-trip times), and each supervised worker's status
file (how often it exited, and how it last did)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from meshllm.cluster import health
from meshllm.cluster.health import GpuInfoAnswer
from meshllm.cluster.state import ClusterState, PidRecord
from meshllm.cluster.tasks import parallel, parallel_or_raise, raise_all
from meshllm.config import Cluster, Device
from meshllm.defaults import COORDINATOR_STAGE
from meshllm.devices import DeviceStatus, StageInfo, SupervisorReport
from meshllm.errors import ConfigError
from meshllm.transport.probe import Probe, stage_info

COLUMNS = ("device", "host", "role", "pid", "state", "layers", "memory", "rtt")


@dataclass(frozen=True)
class DeviceRow:
    device: str
    host: str
    role: str
    pid: str
    state: str  # stopped | down | restarting | healthy | not loaded | unreachable | left out | not answering | ...
    layers: str
    memory: str
    rtt: str

    def cells(self) -> tuple[str, ...]:
        return (self.device, self.host, self.role, self.pid, self.state, self.layers, self.memory, self.rtt)


def collect(cluster: Cluster) -> tuple[list[DeviceRow], GpuInfoAnswer, list[str]]:
    """The rows of the table, the coordinator's gpu-info, and why a machine could not be asked whether
    its process runs (ssh failing), one line each."""
    state = ClusterState(cluster)
    token = state.existing_token()
    records = state.records()
    devices = cluster.device

    def running(device: Device) -> bool:
        record = records.get(device.name)
        if record is None:
            return False
        machine = record.machine_for(str(cluster.path))
        return bool(machine.call("alive", {"pids": [record.pid]})[str(record.pid)])

    alive = parallel(running, devices)  # True, False, or the ConfigError of a machine out of reach
    raise_all(result for result in alive if not isinstance(result, (bool, ConfigError)))

    def worker_info(device: Device) -> Probe[StageInfo] | None:
        """A worker's own account of itself (the coordinator's comes from gpu-info)."""
        return None if device.is_coordinator else stage_info(device.address, token, device=device.name)

    infos = parallel_or_raise(worker_info, devices)  # stage_info answers failures: a raise is a bug

    def report(device: Device) -> SupervisorReport | None:
        record = records.get(device.name)
        return record.report(str(cluster.path)) if record is not None else None

    reports = parallel(report, devices)  # a machine out of reach was already said by `alive`
    gpu_info = health.gpu_info(cluster.api_url, cluster.cluster.api_key)
    entries = device_entries(cluster, gpu_info)
    rows = []
    problems = [str(result) for result in alive if isinstance(result, ConfigError)]
    for device, is_alive, info, found in zip(devices, alive, infos, reports, strict=True):
        supervised = found if isinstance(found, SupervisorReport) else None
        rows.append(
            _row(device, records.get(device.name), is_alive, info, entries.get(device.name), supervised)
        )
        if supervised is not None and supervised.exits and is_alive is True:
            problems.append(supervised.problem())
    return rows, gpu_info, problems


def device_entries(cluster: Cluster, gpu_info: GpuInfoAnswer) -> dict[str, DeviceStatus]:
    """gpu-info's devices by device name (the coordinator calls its own stage COORDINATOR_STAGE)."""
    devices = gpu_info.info.devices if gpu_info.info else []
    return {
        cluster.coordinator.name if entry.name == COORDINATOR_STAGE else entry.name: entry
        for entry in devices
    }


def _row(
    device: Device,
    record: PidRecord | None,
    running: bool | Exception,
    info: Probe[StageInfo] | None,
    entry: DeviceStatus | None,
    report: SupervisorReport | None = None,
) -> DeviceRow:
    layers = memory = rtt = "-"
    alive = running is True
    if record is None:
        state = "stopped"
    elif isinstance(running, Exception):
        state = "unknown"
    elif not alive:
        state = "down"
    elif report is not None and report.state == "waiting":
        state = "restarting"  # its supervisor starts the worker again after the backoff
    elif entry is not None:
        state = entry.status if entry.in_plan else "left out"  # the others run its layers (re-planned)
    elif info is not None and info.reply is not None:
        state = "loaded" if info.reply.num_layers else "not loaded"
    else:
        state = "not answering"
    if alive and entry is not None:
        layers = format_layers(*entry.layers) if entry.in_plan else "-"
        memory = f"{format_bytes(entry.weight_bytes)}/{format_bytes(entry.memory_total)}"
        rtt = f"{entry.rtt_ms:.1f} ms" if entry.rtt_ms is not None else "-"
    elif alive and info is not None and info.reply is not None:
        stage = info.reply
        if stage.num_layers:
            layers = format_layers(*(stage.layers or (0, 0)))
        memory = f"{format_bytes(stage.weight_bytes)}/{format_bytes(stage.memory_total)}"
    pid = str(record.pid) if record else "-"
    return DeviceRow(device.name, device.host, device.role, pid, state, layers, memory, rtt)


def format_layers(start: int, end: int) -> str:
    return f"[{start}, {end})"


def format_bytes(size: float | None) -> str:
    """1.2 GB, 427.3 MB, 12.0 kB, or - for none."""
    if not size:
        return "-"
    if size >= 1e8:
        return f"{size / 1e9:.1f} GB"
    if size >= 1e5:
        return f"{size / 1e6:.1f} MB"
    return f"{size / 1e3:.1f} kB"


def format_table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows
    ]


def show_status(cluster: Cluster, echo: Callable[[str], None] = print) -> int:
    """Print the table and the API's state; 0 when every device is healthy, else 1."""
    rows, gpu_info, problems = collect(cluster)
    for line in format_table([COLUMNS, *(row.cells() for row in rows)]):
        echo(line)
    for problem in problems:
        echo(problem)
    info = gpu_info.info
    if info is not None:
        echo(f"API {cluster.api_url}/v1: {info.cluster_status} · model {info.model}")
    else:
        echo(f"API {cluster.api_url}/v1: {gpu_info.problem or 'not answering'}")
    healthy = all(row.state == "healthy" for row in rows)
    return 0 if healthy and info is not None else 1
