"""What a device has: hostname, accelerator type and memory (total and available, in bytes)."""

from __future__ import annotations

import os
import platform
import socket
import subprocess
from dataclasses import dataclass


@dataclass(frozen=True)
class DeviceInfo:
    hostname: str
    device_type: str  # cpu | cuda | mps | metal
    device_name: str
    memory_total: int
    memory_available: int


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


def describe_device(engine: str, device_type: str) -> DeviceInfo:
    """Memory of the accelerator the engine runs on (system memory for cpu, mps and metal)."""
    total, available = system_memory()
    name = platform.processor() or platform.machine() or "cpu"
    if device_type == "cuda":
        import torch

        available, total = torch.cuda.mem_get_info()
        name = torch.cuda.get_device_name()
    return DeviceInfo(socket.gethostname(), device_type, name, total, available)
