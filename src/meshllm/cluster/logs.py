"""`meshllm cluster logs [DEVICE] [-f] [-n N]`: the devices' logs, read where they are (over ssh for remote ones).

The processes log `TIME HOST [ROLE] LEVEL ...` on every line; with several devices each line is also
prefixed with the device's name, so merged output says where every line came from.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import TextIO

from meshllm.cluster.launch import Machine
from meshllm.cluster.state import ClusterState
from meshllm.config import Cluster, Device


def log_location(cluster: Cluster, state: ClusterState, device: Device) -> tuple[Machine, str]:
    """Where the device's log is: the one its pid file names, else where the next start will write it."""
    record = state.records().get(device.name)
    if record is not None:
        return record.machine_for(str(cluster.path)), record.log
    path = state.log_path(device)
    if not os.path.isabs(path):
        path = f"{device.workdir.rstrip('/')}/{path}"
    return Machine.of(device, cluster.path), path


def read_log_tail(machine: Machine, path: str, lines: int) -> list[str]:
    """The last lines of a log on the device's machine ([] when it cannot be read)."""
    if not machine.ssh:  # read here: no process to start, none to fail quietly
        try:
            with open(os.path.expanduser(path), "rb") as handle:
                text = handle.read().decode(errors="replace")
        except OSError:
            return []
        return [line for line in text.splitlines() if line.strip()][-lines:]
    process = machine.tail(path, lines, follow=False)
    assert process.stdout is not None and process.stderr is not None
    output = process.stdout.read()  # ends with the script (ssh gives up after its ConnectTimeout)
    process.stderr.read()
    process.wait()
    return [line for line in output.splitlines() if line.strip()]


def show_logs(
    cluster: Cluster, device_name: str | None, lines: int, follow: bool, out: TextIO = sys.stdout
) -> int:
    state = ClusterState(cluster)
    devices = [cluster.get(device_name)] if device_name else list(cluster.device)
    width = max(len(device.name) for device in devices)
    lock = threading.Lock()

    def pump(device: Device) -> None:
        machine, path = log_location(cluster, state, device)
        prefix = f"{device.name:<{width}} | " if len(devices) > 1 else ""
        process = machine.tail(path, lines, follow)
        processes.append(process)
        assert process.stdout is not None
        for line in process.stdout:
            with lock:
                out.write(prefix + line)
                out.flush()
        process.wait()
        if process.returncode and process.stderr is not None:
            problem = process.stderr.read().strip().splitlines()
            with lock:
                out.write(f"{prefix}(cannot read {path}: {problem[-1] if problem else 'no message'})\n")

    processes: list = []
    if not follow:  # one device after the other, each as a block
        for device in devices:
            pump(device)
        return 0
    threads = [threading.Thread(target=pump, args=(device,), daemon=True) for device in devices]
    for thread in threads:
        thread.start()
    try:
        for thread in threads:
            thread.join()
    except KeyboardInterrupt:
        pass
    finally:
        for process in processes:
            process.terminate()
    return 0
