"""Diagnosis before anything starts: each problem is one line that names the device and the fix.

The probe (hostscript.probe, run under each device's own `python`, over ssh where it has one) reports
what the machine offers; the functions here turn that into problems: Python too old, meshllm missing or
of another version than the coordinator's, the port in use (and by which pid and command),
the model folder missing there, and the model not fitting in the devices' memory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from meshllm.cluster import hostscript
from meshllm.cluster.launch import Machine
from meshllm.config import Cluster, Device
from meshllm.defaults import SHARED_CORES_ENV
from meshllm.devices import parse_cores

MIN_PYTHON = (3, 10)


def probe(cluster: Cluster, device: Device, machine: Machine) -> dict[str, Any]:
    """The device's facts (see hostscript.probe); raises ConfigError when the machine or python is out of reach."""
    bind, port = cluster.listen(device)
    params = {
        "workdir": device.workdir,
        "model": model_of(cluster, device),
        "engine": device.engine or cluster.cluster.engine,
        "port": port,
        "bind": bind,
    }
    return machine.run_script("probe", params, timeout=30.0)


def model_of(cluster: Cluster, device: Device) -> str | None:
    """The model the device reads from its own disk: the coordinator's, or a worker's own copy; None for a
    worker that takes its weights from the coordinator."""
    return cluster.cluster.model if device.is_coordinator else device.model_path


def summary(device: Device, facts: dict[str, Any], port: int) -> str:
    """'ssh ok · python 3.12 · meshllm 0.1.0 · port 50051 free' for the lines `start` prints."""
    parts = ["ssh ok"] if device.is_remote else []
    parts.append(f"python {facts['python']}")
    if facts.get("meshllm"):
        parts.append(f"meshllm {facts['meshllm']}")
    if "port" in facts:
        parts.append(f"port {port} {'free' if facts['port']['free'] else 'in use'}")
    return " · ".join(parts)


def problems(
    cluster: Cluster,
    device: Device,
    machine: Machine,
    facts: dict[str, Any],
    coordinator_version: str | None,
) -> list[str]:
    """Everything in the probe's facts that would stop this device from starting, one line each.

    A port held by a process of an earlier start never gets here: `start` finds those from the pid files
    first (and stops them with --force). Any other holder is someone else's, which we never touch.
    """
    name, file = device.name, cluster.path
    found: list[str] = []
    version = tuple(int(part) for part in facts["python"].split(".")[:2] if part.isdigit())
    if version < MIN_PYTHON:
        found.append(
            f"device {name!r}: python {facts['python']} ({facts['executable']}) is too old; meshllm needs "
            f'{".".join(map(str, MIN_PYTHON))} or newer: set python = "..." for {name} in {file}'
        )
        return found
    if not facts["meshllm"]:
        found.append(
            f"device {name!r}: meshllm is not importable by {facts['executable']} {machine.where} "
            f"({facts['meshllm_error']}); install it there: {install_command(machine, coordinator_version)} "
            f"(or `meshllm cluster install -c {file}` makes a venv with it)"
        )
        return found
    engine_missing = [
        module for module in facts["missing_modules"] if module in hostscript.ENGINE_MODULES["ggml"]
    ]
    if engine_missing and engine_missing == facts["missing_modules"]:
        found.append(
            f'device {name!r} computes with the ggml engine (engine = "ggml" in {file}) but '
            f"{', '.join(engine_missing)} cannot be imported {machine.where}; `meshllm cluster install -c {file}` "
            f'builds it into meshllm\'s venv there (it needs cmake and a C++ compiler), or drop engine = "ggml"'
        )
    elif facts["missing_modules"]:
        found.append(
            f"device {name!r}: meshllm {facts['meshllm']} is installed there but "
            f"{', '.join(facts['missing_modules'])} cannot be imported; reinstall it: "
            f"{install_command(machine, facts['meshllm'])}"
        )
    if coordinator_version and facts["meshllm"] != coordinator_version and not device.is_coordinator:
        found.append(
            f"device {name!r} runs meshllm {facts['meshllm']}, the coordinator ({cluster.coordinator.name}) "
            f"{coordinator_version}; install the same version on both: "
            f"{install_command(machine, coordinator_version)} (or `meshllm cluster install -c {file}`)"
        )
    port = facts.get("port")
    if port is not None and not port["free"]:
        found.append(_port_problem(cluster, device, port))
    model = facts.get("model") or {}
    if model.get("kind") == "folder" and not model["exists"]:
        key = (
            f"model = {cluster.cluster.model!r}"
            if device.is_coordinator
            else f"model_path = {device.model_path!r}"
        )
        fix = (
            f"copy the checkpoint there or set workdir for {name} in {file}"
            if device.is_coordinator
            else f"copy the checkpoint there, or remove model_path for {name} in {file} to take the weights "
            "from the coordinator"
        )
        found.append(
            f"device {name!r}: model folder {model['path']} does not exist there ({key}, relative to "
            f"workdir {facts['workdir']}); {fix}"
        )
    elif model.get("kind") == "folder" and not model["checkpoint"]:
        found.append(
            f"device {name!r}: {model['path']} is not a checkpoint folder (no config.json); "
            f"point {'[cluster] model' if device.is_coordinator else 'model_path'} at a Hugging Face "
            "checkpoint folder, a hub id or a .gguf file"
        )
    return found


def _port_problem(cluster: Cluster, device: Device, port: dict[str, Any]) -> str:
    _, number = cluster.listen(device)
    setting = "api_port = N in [cluster]" if device.is_coordinator else f"port = N for {device.name}"
    where = f"device {device.name!r}: port {number} on {device.host} is in use"
    holders = port.get("holders") or []
    if not holders:
        return f"{where} (by a process this user cannot see); stop it, or set {setting} in {cluster.path}"
    holder = holders[0]
    pid, command = holder["pid"], _short(holder["command"])
    if "meshllm" in command:
        return (
            f"{where} by pid {pid} ({command}), a meshllm process that no pid file of this cluster names; "
            f"stop it (kill {pid}), or set {setting} in {cluster.path}"
        )
    return f"{where} by pid {pid} ({command}); stop it, or set {setting} in {cluster.path}"


def _short(command: str, limit: int = 80) -> str:
    return command if len(command) <= limit else command[: limit - 1] + "…"


def install_command(machine: Machine, version: str | None) -> str:
    package = f"meshllm=={version}" if version else "meshllm"
    command = f"{machine.python} -m pip install {package}"
    return f"ssh {machine.ssh} '{command}'" if machine.ssh else command


def threads_for(cluster: Cluster, device: Device, cpu_count: int) -> int:
    """The device's `threads`, else its own `cores`' number, else its machine's cores split evenly
    between the stages that share them."""
    if device.threads:
        return device.threads
    if device.cores:
        return len(parse_cores(device.cores))
    return max(1, cpu_count // _sharing(cluster, device))


def threads_alone_for(cluster: Cluster, device: Device, cpu_count: int) -> int | None:
    """The threads of a step alone in the pipeline: the machine's cores where the device shares them
    with other stages (by default), else None (its `threads`)."""
    shared = _sharing(cluster, device) > 1 and not device.cores
    return cpu_count if shared and not device.threads and cpu_count > 1 else None


def _sharing(cluster: Cluster, device: Device) -> int:
    """The stages on the device's machine that share its cores (those given cores of their own do not)."""
    return sum(1 for other in cluster.device if other.machine == device.machine and not other.cores)


def compute_env(cluster: Cluster, device: Device, cpu_count: int) -> dict[str, str]:
    """The environment a device's process computes in: its threads, and where it shares its machine's
    cores with other stages, idle OpenMP threads that give them back soon (`SHARED_CORES_ENV`)."""
    env = {"OMP_NUM_THREADS": str(threads_for(cluster, device, cpu_count))}
    if threads_alone_for(cluster, device, cpu_count):
        env.update(SHARED_CORES_ENV)
    return env


def check_memory_fit(cluster: Cluster, memory_available: dict[str, int | None]) -> None:
    """Raise ConfigError (from the layer plan) when the model's weights do not fit in the devices' memory.

    Memory is each device's `memory` override, else what its probe found free. Checked only where the
    checkpoint can be read from here; otherwise the coordinator checks the same plan when it starts.
    """
    from meshllm.models.plan import make_plan

    checkpoint = _readable_checkpoint(cluster)
    if checkpoint is None:
        return
    devices = []
    for device in [cluster.coordinator, *cluster.workers]:
        memory = int(device.memory * 1e9) if device.memory else memory_available.get(device.name)
        if memory is None:
            return
        devices.append((device.name, memory))
    make_plan(checkpoint, devices, checkpoint.served_dtype(cluster.cluster.dtype))


def _readable_checkpoint(cluster: Cluster) -> Any:
    """The model's checkpoint when this machine can read it without downloading anything, else None."""
    from meshllm.models.checkpoint import DEMO_MODEL, Checkpoint
    from meshllm.models.gguf import is_gguf

    model, coordinator = cluster.cluster.model, cluster.coordinator
    if coordinator.is_remote:
        return None
    try:
        if model == DEMO_MODEL:
            from meshllm.models.tiny import demo_checkpoint

            return Checkpoint(demo_checkpoint())
        path = Path(coordinator.workdir).expanduser() / Path(model).expanduser()
        if (path / "config.json").is_file() or is_gguf(path):
            return Checkpoint(path)
        if model.count("/") == 1 and not model.startswith((".", "/", "~")):
            from huggingface_hub import snapshot_download

            cached = snapshot_download(
                model, local_files_only=True, allow_patterns=["*.json", "*.safetensors"]
            )
            return Checkpoint(Path(cached))
    except Exception:  # not a checkpoint, not cached, no hub client: the coordinator will say
        return None
    return None
