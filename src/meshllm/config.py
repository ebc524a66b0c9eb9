"""The cluster file: one `[cluster]` table and one `[[device]]` table per machine, as frozen pydantic models.

Every error names the file, the device (or table) and the field, and says what a valid value looks like:
`cluster.toml: device 'mini2': port must be an integer between 1 and 65535, got 'abc'`.

Defaults that depend on other entries are filled in while loading, so the models hold final values:
the first device is the coordinator unless one says `role = "coordinator"`; workers get ports 50051 and up
per host; `host` defaults to the ssh target's host (or 127.0.0.1); `python` to this interpreter for local
devices and `python3` over ssh; `workdir` to the cluster file's folder (local) or the home folder (ssh).
"""

from __future__ import annotations

import difflib
import ipaddress
import re
import sys
from pathlib import Path
from typing import Annotated, Any, get_args

from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError, model_validator

from meshllm.defaults import (
    AUTO_DTYPE,
    COORDINATOR_STAGE,
    DEFAULT_API_PORT,
    DEFAULT_STAGE_PORT,
    DTYPES,
    ENGINES,
    QUANTIZE_MODES,
    SHARED_STAGES,
    EngineName,
    QuantizeMode,
)
from meshllm.devices import Role as RoleName
from meshllm.devices import parse_cores
from meshllm.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - 3.10
    import tomli as tomllib

ROLES: tuple[str, ...] = get_args(RoleName)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


# Field checks with messages a user can act on (pydantic's own wording names types, not fixes).
def _port(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ValueError(f"must be an integer between 1 and 65535, got {value!r}")
    return value


def _name(value: Any) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise ValueError(f"must be letters, digits, '.', '_' or '-' (no spaces), got {value!r}")
    return value


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"must be a non-empty string, got {value!r}")
    return value


def _host(value: Any) -> str:
    if not isinstance(value, str) or not value or any(char.isspace() for char in value):
        raise ValueError(f"must be a host name or IP address, got {value!r}")
    return value


def _positive_number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"must be a number greater than 0, got {value!r}")
    return float(value)


def _non_negative_number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"must be a number of at least 0, got {value!r}")
    return float(value)


def _positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"must be an integer of at least 1, got {value!r}")
    return value


def _choice(*choices: str) -> BeforeValidator:
    def check(value: Any) -> str:
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(map(repr, choices))}, got {value!r}")
        return value

    return BeforeValidator(check)


def _env(value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        raise ValueError(f'must be a table of NAME = "value", got {value!r}')
    env = {}
    for key, item in value.items():
        if isinstance(item, bool) or not isinstance(item, (str, int, float)):
            raise ValueError(f"{key} must be a string or a number, got {item!r}")
        env[key] = str(item)
    return env


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, got {value!r}")
    return value


def _strings(value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
        raise ValueError(f'must be a list of strings, e.g. ["StrictHostKeyChecking=no"], got {value!r}')
    return value


def _cores(value: Any) -> str:
    """A list of CPU cores ("0-7", "0-3,8-11"; a single core may be a number), kept as written."""
    text = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(text, str):
        raise ValueError(f'must be a list of cores such as "0-7" or "0-3,8-11", got {value!r}')
    parse_cores(text)  # its ValueError says what is wrong
    return text.replace(" ", "")


Port = Annotated[int, BeforeValidator(_port)]
Cores = Annotated[str, BeforeValidator(_cores)]
Name = Annotated[str, BeforeValidator(_name)]
Text = Annotated[str, BeforeValidator(_text)]
Host = Annotated[str, BeforeValidator(_host)]
PositiveNumber = Annotated[float, BeforeValidator(_positive_number)]
NonNegativeNumber = Annotated[float, BeforeValidator(_non_negative_number)]
PositiveInt = Annotated[int, BeforeValidator(_positive_int)]
Engine = Annotated[EngineName, _choice(*ENGINES)]
Dtype = Annotated[str, _choice(AUTO_DTYPE, *DTYPES)]  # auto: the model's own
SharedStages = Annotated[str, _choice(*SHARED_STAGES)]
Quantize = Annotated[QuantizeMode, _choice(*QUANTIZE_MODES)]
Role = Annotated[RoleName, _choice(*ROLES)]
Env = Annotated[dict[str, str], BeforeValidator(_env)]
Strings = Annotated[list[str], BeforeValidator(_strings)]
Flag = Annotated[bool, BeforeValidator(_flag)]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ClusterSettings(_Frozen):
    """The `[cluster]` table: what runs and how it is reached."""

    name: Name
    model: Text  # a local folder (relative to each device's workdir), a hub id, or "demo"
    dtype: Dtype | None = None  # None: the coordinator's default (auto: the model's own)
    quantize: Quantize | None = None  # int8 | int4: linear layers held quantized; None: as stored
    quantize_group: PositiveInt | None = None  # int4's inputs per scale; None: the default (64)
    engine: Engine | None = None  # None: each machine's default (`engines.default_engine`)
    api_host: Host | None = None  # where the API listens; None: see Cluster.api_bind
    api_port: Port = DEFAULT_API_PORT
    api_key: Text | None = None
    token: Text | None = None  # the token every gRPC call between stages carries
    token_file: Path | None = None
    state_dir: Path  # pid files, local logs, the generated token and certificates
    # Mutual TLS on every gRPC link: on unless every device is on loopback (then `tls = true` asks for it);
    # `insecure = true` turns it off (start warns). tls_ca/tls_cert/tls_key: the user's own certificates
    # (a device's own tls_cert/tls_key come first); without them start makes a cluster CA and certificates.
    tls: Flag = False
    insecure: Flag = False
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    step_timeout: PositiveNumber | None = None  # seconds a pipeline step may take before it fails
    replay_timeout: PositiveNumber | None = None  # seconds sequences wait for a lost stage to come back
    replan_after: NonNegativeNumber | None = None  # seconds before a lost worker's layers move (0: never)
    shared_stages: SharedStages | None = None  # how stages on the same cores run (`serve --shared-stages`)
    weights_port: Port | None = None  # where workers without a copy fetch weights; None: api_port + 1


class Device(_Frozen):
    """One `[[device]]` table: a process on one machine (the coordinator or a worker)."""

    name: Name
    host: Host  # the address the other machines (and this CLI) dial
    port: Port | None = None  # the worker's gRPC port; None for the coordinator
    step_port: Port | None = None  # the worker's step links (`--step-port`); None: any free port
    bind: Host | None = None  # the address the process listens on; None: see Device.listen_host
    role: Role
    engine: Engine | None = None
    quantize: Quantize | None = None  # this device's own choice; None: the cluster's
    ssh: Text | None = None  # "user@host" or a Host alias of ~/.ssh/config; None: this machine
    ssh_port: Port | None = None
    ssh_key: Text | None = None
    ssh_options: Strings = []  # each entry is passed as `ssh -o ENTRY`
    python: Text  # the interpreter that runs meshllm there
    workdir: Text  # the folder the process runs in there; relative model paths start here
    memory: PositiveNumber | None = None  # GB the plan may use here (default: what the machine has free)
    threads: PositiveInt | None = None  # compute threads (default: the machine's cores ÷ its stages)
    cores: Cores | None = None  # the CPU cores it runs on (`--cores`); None: every core of the machine
    env: Env = {}
    # This worker's own copy of the model (a folder there, relative to workdir, or a hub id it downloads
    # itself); None: it takes its layers' weights from the coordinator.
    model_path: Text | None = None
    venv: Text | None = (
        None  # where `cluster install` makes meshllm's venv there (default <workdir>/.meshllm/venv)
    )
    # The index `cluster install` takes torch from: None chooses by platform (the CPU build's index on
    # Linux without an NVIDIA driver, else the device's own index); "" the device's own index.
    torch_index: str | None = None
    tls_cert: Path | None = None  # this device's own certificate (signed by [cluster] tls_ca) and key,
    tls_key: Path | None = None  # on this machine; start hands them to the device

    @property
    def is_coordinator(self) -> bool:
        return self.role == "coordinator"

    @property
    def is_remote(self) -> bool:
        return self.ssh is not None

    @property
    def listen_host(self) -> str:
        """Loopback hosts listen on themselves; any other host listens on every interface, so that a
        host name resolving to another interface on the machine itself (e.g. 127.0.1.1) cannot strand it."""
        return self.bind or (self.host if is_loopback(self.host) else "0.0.0.0")

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def machine(self) -> str:
        """Devices with the same machine key share one machine's cores."""
        return f"ssh:{self.ssh}:{self.ssh_port or 22}" if self.ssh else "local"


class Cluster(_Frozen):
    """The whole file. `path` is where it was read from; relative paths in it start at its folder."""

    path: Path
    cluster: ClusterSettings
    device: list[Device]

    @model_validator(mode="after")
    def _check(self) -> Cluster:
        where = str(self.path)
        if not self.device:
            raise ConfigError(f"{where}: no [[device]] tables; add one per machine")
        coordinators = [device.name for device in self.device if device.is_coordinator]
        if len(coordinators) != 1:
            raise ConfigError(
                f'{where}: exactly one device must have role = "coordinator", found {len(coordinators)} '
                f"({', '.join(map(repr, coordinators))})"
            )
        seen_names: set[str] = set()
        seen_addresses: dict[tuple[str, int], str] = {}
        for device in self.device:
            if device.name in seen_names:
                raise ConfigError(f"{where}: two devices are named {device.name!r}; names must differ")
            seen_names.add(device.name)
            if device.name == COORDINATOR_STAGE and not device.is_coordinator:
                raise ConfigError(
                    f"{where}: device 'coordinator': that name is the coordinator's own stage; "
                    "give this worker another name"
                )
            if device.is_coordinator:
                if device.model_path is not None:
                    raise ConfigError(
                        f"{where}: device {device.name!r}: model_path is for workers; the coordinator reads "
                        "[cluster] model"
                    )
                for key_name in ("port", "step_port"):
                    if getattr(device, key_name) is not None:
                        raise ConfigError(
                            f"{where}: device {device.name!r}: {key_name} is for workers; the coordinator "
                            "listens on [cluster] api_port"
                        )
                key = (device.host, self.cluster.api_port)
            else:
                assert device.port is not None  # filled in while loading
                key = (device.host, device.port)
            if key in seen_addresses:
                raise ConfigError(
                    f"{where}: devices {seen_addresses[key]!r} and {device.name!r} both use port {key[1]} on "
                    f"{key[0]}; give one of them another port"
                )
            seen_addresses[key] = device.name
        weights = (self.coordinator.host, self.weights_port)
        if self.takes_weights and weights in seen_addresses:
            raise ConfigError(
                f"{where}: the coordinator serves weights on port {weights[1]}, which device "
                f"{seen_addresses[weights]!r} uses on {weights[0]}; set [cluster] weights_port to another port"
            )
        if self.cluster.token and self.cluster.token_file:
            raise ConfigError(f"{where}: [cluster]: give token or token_file, not both")
        self._check_tls()
        return self

    def _check_tls(self) -> None:
        where, settings = str(self.path), self.cluster
        if settings.insecure and (settings.tls or settings.tls_ca):
            raise ConfigError(
                f"{where}: [cluster]: insecure = true turns TLS off; remove it, or remove tls and tls_ca"
            )
        if (settings.tls_cert is None) != (settings.tls_key is None):
            raise ConfigError(f"{where}: [cluster]: give tls_cert and tls_key together")
        for device in self.device:
            if (device.tls_cert is None) != (device.tls_key is None):
                raise ConfigError(f"{where}: device {device.name!r}: give tls_cert and tls_key together")
            own = device.tls_cert is not None or settings.tls_cert is not None
            if settings.tls_ca is None and own:
                raise ConfigError(
                    f"{where}: device {device.name!r}: tls_cert needs [cluster] tls_ca, the CA that signed it "
                    "(or leave all three out and `meshllm cluster start` makes them)"
                )
            if settings.tls_ca is not None and not own:
                raise ConfigError(
                    f"{where}: device {device.name!r}: [cluster] tls_ca is given, so every device needs a "
                    "certificate it signed: add tls_cert and tls_key to the device (or to [cluster])"
                )

    @property
    def uses_tls(self) -> bool:
        """Whether the gRPC links are mutual TLS: unless `insecure = true`, always when a device is off
        loopback; on loopback only when asked for (`tls = true`, or the file's own certificates)."""
        settings = self.cluster
        if settings.insecure:
            return False
        on_loopback = all(is_loopback(device.host) for device in self.device)
        return settings.tls or settings.tls_ca is not None or not on_loopback

    @property
    def name(self) -> str:
        return self.cluster.name

    @property
    def weights_port(self) -> int:
        """Where the coordinator serves weights to the workers without their own copy."""
        return self.cluster.weights_port or self.cluster.api_port + 1

    @property
    def takes_weights(self) -> bool:
        """Some worker has no copy of its own and takes its weights from the coordinator."""
        return any(device.model_path is None for device in self.workers)

    @property
    def coordinator(self) -> Device:
        return next(device for device in self.device if device.is_coordinator)

    @property
    def workers(self) -> list[Device]:
        """Workers in chain order: the order of the file."""
        return [device for device in self.device if not device.is_coordinator]

    def get(self, name: str) -> Device:
        for device in self.device:
            if device.name == name:
                return device
        raise ConfigError(
            f"{self.path}: no device named {name!r} (devices: {', '.join(d.name for d in self.device)})"
        )

    def listen(self, device: Device) -> tuple[str, int]:
        """(address, port) the device's process listens on: a worker's gRPC port, the coordinator's API."""
        if device.is_coordinator:
            return self.api_bind, self.cluster.api_port
        assert device.port is not None  # every worker has one once loaded
        return device.listen_host, device.port

    def dial(self, device: Device) -> str:
        """host:port where this CLI (and the other stages) reach the device's process."""
        if device.is_coordinator:
            return self.api_url.removeprefix("http://")
        return device.address

    @property
    def api_bind(self) -> str:
        """Where the API listens: [cluster] api_host, else as a worker would (see Device.listen_host)."""
        return self.cluster.api_host or self.coordinator.listen_host

    @property
    def api_url(self) -> str:
        """The URL clients use: the coordinator's host (or api_host when that is a specific address)."""
        host = self.cluster.api_host
        if host is None or host in ("0.0.0.0", "::"):
            host = self.coordinator.host
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.cluster.api_port}"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_cluster(path: str | Path) -> Cluster:
    """Read and check a cluster file; raises ConfigError naming the file, the device and the field."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such cluster file (see examples/local.toml)") from None
    except OSError as error:
        raise ConfigError(f"{path}: cannot read it ({error.strerror})") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML ({error})") from None
    return parse_cluster(raw, path)


def parse_cluster(raw: dict[str, Any], path: Path) -> Cluster:
    """The checked Cluster of a parsed TOML document that was read from `path`."""
    folder = path.resolve().parent
    unknown = sorted(set(raw) - {"cluster", "device"})
    if unknown:
        raise ConfigError(f"{path}: {_unknown_key(unknown[0], ['cluster', 'device'], 'table')}")
    table = raw.get("cluster")
    if not isinstance(table, dict):
        raise ConfigError(f'{path}: a [cluster] table is required, with at least model = "..."')
    devices = raw.get("device", [])
    if not isinstance(devices, list) or not all(isinstance(device, dict) for device in devices):
        raise ConfigError(f"{path}: devices are [[device]] tables (note the double brackets)")

    table = dict(table)
    table.setdefault("name", path.stem)
    if isinstance(table.get("name"), str):
        table.setdefault("state_dir", folder / ".meshllm" / table["name"])
    for key in ("state_dir", "token_file", "tls_ca", "tls_cert", "tls_key"):
        if isinstance(table.get(key), str):
            table[key] = folder / Path(table[key]).expanduser()
    settings = _validate(ClusterSettings, table, path, "[cluster]")
    filled = _fill_device_defaults([dict(device) for device in devices], folder)
    for device in filled:
        for key in ("tls_cert", "tls_key"):
            if isinstance(device.get(key), str):
                device[key] = folder / Path(device[key]).expanduser()
    checked = [
        _validate(Device, device, path, f"device {device.get('name', index + 1)!r}")
        for index, device in enumerate(filled)
    ]
    return Cluster(path=path, cluster=settings, device=checked)


def _fill_device_defaults(devices: list[dict[str, Any]], folder: Path) -> list[dict[str, Any]]:
    """Defaults that depend on the other devices: role, host, worker ports (50051 and up per host)."""
    if devices and not any(device.get("role") == "coordinator" for device in devices):
        devices[0].setdefault("role", "coordinator")
    for device in devices:
        device.setdefault("role", "worker")
        ssh = device.get("ssh")
        if isinstance(ssh, str) and ssh:
            device.setdefault("host", ssh.rsplit("@", 1)[-1])
            device.setdefault("python", "python3")
            device.setdefault("workdir", "~")
        else:
            device.setdefault("host", "127.0.0.1")
            device.setdefault("python", sys.executable)
            device.setdefault("workdir", str(folder))
    taken = {(str(d.get("host")), d["port"]) for d in devices if isinstance(d.get("port"), int)}
    for device in devices:
        if device["role"] == "worker" and "port" not in device:
            port = DEFAULT_STAGE_PORT
            while (str(device["host"]), port) in taken:
                port += 1
            device["port"] = port
            taken.add((str(device["host"]), port))
    return devices


def _validate(model: type[_Frozen], data: dict[str, Any], path: Path, where: str) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as error:
        # An unknown key first: a misspelt key also shows up as a missing one, and the typo is the news.
        problems = sorted(error.errors(), key=lambda problem: problem["type"] != "extra_forbidden")
        raise ConfigError(f"{path}: {where}: {_describe(problems[0], model)}") from None


def _describe(problem: Any, model: type[_Frozen]) -> str:
    field = ".".join(str(part) for part in problem["loc"])
    if problem["type"] == "extra_forbidden":
        return _unknown_key(field, list(model.model_fields), "key")
    if problem["type"] == "missing":
        return f"{field} is required"
    message = problem["msg"].removeprefix("Value error, ")
    if problem["type"] != "value_error":
        message = f"{message}, got {problem.get('input')!r}"
    return f"{field} {message}"


def _unknown_key(key: str, known: list[str], kind: str) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"did you mean {close[0]!r}?" if close else f"known: {', '.join(known)}"
    return f"unknown {kind} {key!r} ({hint})"
