"""The state folder of a cluster: one pid file per started process, the local logs, the cluster token.

```
<state_dir>/            default: .meshllm/<cluster name> next to the cluster file
  pids/<device>.json    what `stop` needs: the pid, where it runs (ssh target, python) and its log there
  logs/<device>.log     logs of the devices on this machine
  status/<device>.json  each supervised worker's state and last exit, written by `meshllm supervise`
  installs/<device>.json  the venv python `cluster install` made there (used by every later command)
  wheels/               the wheel of this meshllm that `cluster install` copies to the devices
  token                 the cluster token (made once when the file gives none), readable by this user only
```
Devices reached over ssh keep their log, status file and token in `<workdir>/.meshllm/<cluster name>/` on their machine.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from meshllm.cluster.launch import Machine
from meshllm.config import Cluster, Device
from meshllm.devices import SupervisorReport
from meshllm.errors import ConfigError


class PidRecord(BaseModel):
    """A started process: enough to find it, stop it and read its log without the cluster file."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    device: str
    role: str
    pid: int
    address: str  # host:port it answers on (the API's for the coordinator)
    listen: str  # the address it listens on, for the port checks
    port: int
    log: str  # the log file on its machine
    machine: dict[str, Any]  # Machine.to_record()
    version: str  # meshllm's version there when it started
    started_at: float
    status_file: str | None = (
        None  # a supervised worker's status file on its machine (see runtime/supervisor.py)
    )

    def machine_for(self, config_file: str) -> Machine:
        return Machine.from_record(self.device, config_file, self.machine)

    def report(self, config_file: str) -> SupervisorReport | None:
        """The supervisor's last report of a supervised worker (None: none, or not readable yet).
        Raises ConfigError when its machine is out of reach."""
        if not self.status_file:
            return None
        content = self.machine_for(config_file).call("read_json", {"path": self.status_file})["content"]
        try:
            report = SupervisorReport.model_validate(content) if content else None
        except ValidationError:
            return None
        # a report of an earlier start's supervisor (the new one has not written yet) says nothing of this one
        return report if report is not None and report.supervisor_pid == self.pid else None


class ClusterState:
    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.root = cluster.cluster.state_dir
        self.pid_dir = self.root / "pids"
        self.log_dir = self.root / "logs"

    # -- pid files -----------------------------------------------------------------------------------

    def records(self) -> dict[str, PidRecord]:
        """Every pid file, including those of devices since removed from the cluster file."""
        records = {}
        for path in sorted(self.pid_dir.glob("*.json")):
            try:
                record = PidRecord.model_validate_json(path.read_text())
            except (OSError, ValidationError):
                continue  # half-written or from another version: nothing we may safely act on
            records[record.device] = record
        return records

    def write(self, record: PidRecord) -> None:
        self.pid_dir.mkdir(parents=True, exist_ok=True)
        path = self.pid_dir / f"{record.device}.json"
        partial = path.with_suffix(".partial")
        partial.write_text(record.model_dump_json(indent=2) + "\n")
        partial.replace(path)

    def remove(self, device: str) -> None:
        (self.pid_dir / f"{device}.json").unlink(missing_ok=True)

    def new_record(
        self, device: Device, pid: int, log: str, version: str, status_file: str | None = None
    ) -> PidRecord:
        listen, port = self.cluster.listen(device)
        return PidRecord(
            device=device.name,
            role=device.role,
            pid=pid,
            address=self.cluster.dial(device),
            listen=listen,
            port=port,
            log=log,
            machine=Machine.of(device, self.cluster.path).to_record(),
            version=version,
            started_at=time.time(),
            status_file=status_file,
        )

    # -- the pythons `cluster install` made ----------------------------------------------------------

    def record_install(self, device: Device, python: str, version: str) -> None:
        """Remember the venv's python made for `device` (from the python the file names)."""
        folder = self.root / "installs"
        folder.mkdir(parents=True, exist_ok=True)
        record = {"python": python, "base": device.python, "version": version, "at": time.time()}
        path = folder / f"{device.name}.json"
        path.with_suffix(".partial").write_text(json.dumps(record, indent=2) + "\n")
        path.with_suffix(".partial").replace(path)

    def installed_python(self, device: Device) -> str | None:
        """The venv python `cluster install` made for `device`, while the file still names the python
        it was made from (a python set by hand since wins)."""
        try:
            record = json.loads((self.root / "installs" / f"{device.name}.json").read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(record, dict) or record.get("base") != device.python:
            return None
        python = record.get("python")
        return python if isinstance(python, str) and python else None

    # -- where files go on each machine --------------------------------------------------------------

    def log_path(self, device: Device) -> str:
        """The log file on the device's machine (relative paths start at its workdir)."""
        if device.is_remote:
            return f".meshllm/{self.cluster.name}/logs/{device.name}.log"
        return str(self.log_dir / f"{device.name}.log")

    def status_path(self, device: Device) -> str:
        """The supervisor's status file of a worker, on its machine (relative paths start at its workdir)."""
        if device.is_remote:
            return f"{device.workdir.rstrip('/')}/.meshllm/{self.cluster.name}/status/{device.name}.json"
        return str(self.root / "status" / f"{device.name}.json")

    def token_path(self, device: Device) -> str:
        if device.is_remote:
            return f".meshllm/{self.cluster.name}/token"
        return str(self.root / "token")

    # -- the cluster token ---------------------------------------------------------------------------

    def token(self) -> str:
        """[cluster] token, the contents of token_file, or a token made once and kept in the state folder."""
        token = self.existing_token()
        if token is not None:
            return token
        self.root.mkdir(parents=True, exist_ok=True)
        token = secrets.token_urlsafe(24)
        descriptor = os.open(self.root / "token", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.write(token + "\n")
        return token

    def existing_token(self) -> str | None:
        """The token, or None when the file gives none and no start has made one yet."""
        settings = self.cluster.cluster
        if settings.token:
            return settings.token
        if settings.token_file:
            try:
                token = settings.token_file.read_text().strip()
            except OSError as error:
                raise ConfigError(
                    f"{self.cluster.path}: [cluster] token_file {str(settings.token_file)!r}: {error.strerror}"
                ) from None
            if not token:
                raise ConfigError(
                    f"{self.cluster.path}: [cluster] token_file {str(settings.token_file)!r} is empty"
                )
            return token
        path = self.root / "token"
        return path.read_text().strip() if path.exists() else None
