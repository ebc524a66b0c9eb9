"""The state folder of a cluster: one pid file per started process, the local logs, the cluster token.

```
<state_dir>/            default: .meshllm/<cluster name> next to the cluster file
  pids/<device>.json    what `stop` needs: the pid, where it runs (ssh target, python) and its log there
  logs/<device>.log     logs of the devices on this machine
  status/<device>.json  each supervised worker's state and last exit, written by `meshllm supervise`
  installs/<device>.json  the venv python `cluster install` made there (used by every later command)
  wheels/               the wheel of this meshllm that `cluster install` copies to the devices
  token                 the cluster token (made once when the file gives none), readable by this user only
  tls/ca.pem, ca.key    the cluster CA start makes when the links use TLS and the file names no certificates
  tls/<device>.pem,.key each device's certificate (naming its host) and key; keys readable by this user only
```
Devices reached over ssh keep their log, status file, token and certificates (`tls/ca.pem`, `cert.pem`,
`key.pem`) in `<workdir>/.meshllm/<cluster name>/` on their machine.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from meshllm.cluster import certs
from meshllm.cluster.launch import Machine
from meshllm.config import Cluster, Device
from meshllm.devices import SupervisorReport
from meshllm.errors import ConfigError
from meshllm.transport.tls import TlsFiles


@dataclass(frozen=True)
class DeviceTls:
    """A device's certificates: their contents, their paths on its machine (for its command line), and
    the files start writes there first (its own copy, over ssh; nothing for a device on this machine)."""

    files: TlsFiles
    ca: str
    cert: str
    key: str
    to_copy: dict[str, str]

    def argv(self) -> list[str]:
        return ["--tls-ca", self.ca, "--tls-cert", self.cert, "--tls-key", self.key]


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
    tls: bool = False  # started with certificates (mutual TLS on its links)

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
        self,
        device: Device,
        pid: int,
        log: str,
        version: str,
        status_file: str | None = None,
        tls: bool = False,
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
            tls=tls,
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

    # -- certificates ----------------------------------------------------------------------------------

    @property
    def tls_dir(self) -> Path:
        return self.root / "tls"

    def device_tls(self, device: Device, create: bool = True) -> DeviceTls | None:
        """The device's certificates, None when the links are plaintext. Without certificates of the
        file's own, the cluster CA and the device's certificate are made here when missing, no longer
        naming the device's host, signed by another CA, or near their end (`create=False`: None then)."""
        if not self.cluster.uses_tls:
            return None
        if self.cluster.cluster.tls_ca is not None:
            local_paths = self._own_paths(device)
        else:
            generated = self._generated_paths(device, create)
            if generated is None:
                return None
            local_paths = generated
        files = TlsFiles.read(*local_paths, labels=self._labels(device))
        if not device.is_remote:
            ca, cert, key = (str(path) for path in local_paths)
            return DeviceTls(files, ca, cert, key, {})
        folder = f".meshllm/{self.cluster.name}/tls"
        ca, cert, key = f"{folder}/ca.pem", f"{folder}/cert.pem", f"{folder}/key.pem"
        copies = {ca: files.ca.decode(), cert: files.cert.decode(), key: files.key.decode()}
        return DeviceTls(files, ca, cert, key, copies)

    def client_tls(self, create: bool = False) -> TlsFiles | None:
        """What this CLI presents when it asks the workers: the coordinator's certificates."""
        found = self.device_tls(self.cluster.coordinator, create=create)
        return found.files if found else None

    def _labels(self, device: Device) -> tuple[str, str, str]:
        where = f"{self.cluster.path}: device {device.name!r}:"
        return (f"{where} tls_ca", f"{where} tls_cert", f"{where} tls_key")

    def _own_paths(self, device: Device) -> tuple[Path, Path, Path]:
        """The file's own certificates for `device`, checked: signed by its CA, naming the device's host."""
        settings = self.cluster.cluster
        cert, key = device.tls_cert or settings.tls_cert, device.tls_key or settings.tls_key
        assert settings.tls_ca is not None and cert is not None and key is not None  # checked by the config
        files = TlsFiles.read(settings.tls_ca, cert, key, labels=self._labels(device))
        where = f"{self.cluster.path}: device {device.name!r}: tls_cert {str(cert)!r}"
        if not certs.signed_by(files.cert, files.ca):
            raise ConfigError(f"{where} is not signed by [cluster] tls_ca {str(settings.tls_ca)!r}")
        names = certs.names_of(files.cert)
        if device.host not in names:
            raise ConfigError(
                f"{where} names {', '.join(sorted(names)) or 'no host'}, not host {device.host!r} where the "
                "others dial it: hostname verification would refuse it; add that host to its subject "
                "alternative names"
            )
        return settings.tls_ca, cert, key

    def _generated_paths(self, device: Device, create: bool) -> tuple[Path, Path, Path] | None:
        folder = self.tls_dir
        ca_cert, ca_key = folder / "ca.pem", folder / "ca.key"
        cert, key = folder / f"{device.name}.pem", folder / f"{device.name}.key"
        if not create:
            return (ca_cert, cert, key) if ca_cert.exists() and cert.exists() and key.exists() else None
        folder.mkdir(parents=True, exist_ok=True)
        os.chmod(folder, 0o700)
        if ca_cert.exists() and ca_key.exists():
            ca = certs.Pem(ca_cert.read_bytes(), ca_key.read_bytes())
        else:
            ca = certs.make_ca(self.cluster.name)
            certs.write_private(ca_key, ca.key)
            certs.write_private(ca_cert, ca.cert)
        fresh = (
            cert.exists()
            and key.exists()
            and certs.names_of(cert.read_bytes()) == {device.host}
            and certs.signed_by(cert.read_bytes(), ca.cert)
            and certs.still_valid(cert.read_bytes())
        )
        if not fresh:
            issued = certs.make_device_cert(ca, device.name, [device.host])
            certs.write_private(key, issued.key)
            certs.write_private(cert, issued.cert)
        return ca_cert, cert, key

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
