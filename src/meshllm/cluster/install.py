"""`meshllm cluster install` (and `cluster start --install`): meshllm of this very version on every device.

For each device whose `python` lacks meshllm, or has another version of it: check that python can make
a venv there (3.10+, the venv and ensurepip modules, free disk), make one (`venv`, default
`<workdir>/.meshllm/venv`), copy a wheel of the running package there (over ssh for remote devices),
install torch for that machine (`torch_index`: the CPU build's index on Linux without an NVIDIA
driver) and then the wheel with its dependencies from the device's own package index (with mlx on
Apple silicon), then the ggml engine (built there) on a CPU device that names no engine or on one that
names ggml, and record the venv's python in the state folder, so every later command uses it.
A device whose python (or recorded venv) already runs this version, with the engine it names, is not
touched. Every failure is one line naming the device and the fix.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshllm import __version__
from meshllm.cluster.checks import MIN_PYTHON
from meshllm.cluster.launch import Machine, shell_word
from meshllm.cluster.state import ClusterState
from meshllm.cluster.status import format_bytes
from meshllm.cluster.tasks import parallel, raise_all
from meshllm.config import Cluster, Device
from meshllm.errors import ConfigError

CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
# ggml-python builds ggml at install; llama.cpp's tiled mat-muls for prompts (GGML_LLAMAFILE), which
# standalone ggml leaves off, make the ggml engine prefill 2-3x faster.
GGML_BUILD_ENV = {"CMAKE_ARGS": "-DGGML_LLAMAFILE=ON"}
PIP_TIMEOUT_S = 1800.0
# Free disk a venv needs, by the torch build that goes in it (torch and its libraries, the rest, headroom).
NEEDED_BYTES = {"cpu": 2_000_000_000, "cuda": 8_000_000_000, "apple": 2_000_000_000}


@dataclass(frozen=True)
class Installed:
    device: str
    python: str  # the interpreter that runs meshllm there now
    changed: bool  # False: that version was there already, nothing was touched
    detail: str  # for the line printed


class Installer:
    def __init__(self, cluster: Cluster, echo: Callable[[str], None] = print) -> None:
        self.cluster = cluster
        self.state = ClusterState(cluster)
        self.echo = echo
        self._wheel: Path | None = None
        self._wheel_lock = threading.Lock()
        self._venv_locks: dict[tuple[str, str], threading.Lock] = {}  # devices sharing a venv take turns

    def run(self) -> int:
        """Install where needed on every device; raises one ConfigError listing every failure."""
        self._wheel = None
        results = parallel(self.install, self.cluster.device)
        for result in results:
            if isinstance(result, Installed):
                self.echo(f"{result.device}: {result.detail}")
        raise_all(results)
        return 0

    # -- one device ------------------------------------------------------------------------------

    def install(self, device: Device) -> Installed:
        venv = device.venv or f"{device.workdir.rstrip('/')}/.meshllm/venv"
        with self._wheel_lock:
            lock = self._venv_locks.setdefault((device.machine, venv), threading.Lock())
        with lock:
            return self._install(device, venv)

    def _install(self, device: Device, venv: str) -> Installed:
        machine = Machine.of(device, self.cluster.path)
        recorded = self.state.installed_python(device)
        engine = device.engine or self.cluster.cluster.engine
        facts = self._probe(device, machine, engine)
        if _runs_this_version(facts):
            return Installed(
                device.name, device.python, False, f"meshllm {__version__} is there ({facts['executable']})"
            )
        if recorded:
            venv_facts = _quiet_probe(self._with_python(device, recorded), engine)
            if venv_facts and _runs_this_version(venv_facts):
                return Installed(device.name, recorded, False, f"meshllm {__version__} is there ({recorded})")
        self._check_python(device, machine, facts)
        started = time.monotonic()
        where = machine.run_script("venv_check", {"path": venv}, timeout=60.0)
        if where["python"]:  # a venv of an earlier install (or another device's on this machine)
            venv_facts = _quiet_probe(self._with_python(device, where["python"]), engine)
            if venv_facts and _runs_this_version(venv_facts):
                self.state.record_install(device, where["python"], __version__)
                return Installed(
                    device.name, where["python"], False, f"meshllm {__version__} is there ({where['python']})"
                )
        kind = "apple" if (facts["platform"], facts["machine"]) == ("darwin", "arm64") else (
            "cuda" if where["nvidia"] else "cpu"
        )  # fmt: skip
        self._check_venv(device, machine, facts, where, NEEDED_BYTES[kind])
        made = machine.run_script("make_venv", {"path": venv}, timeout=300.0)
        if "error" in made:
            raise ConfigError(
                f"device {device.name!r}: `{facts['executable']} -m venv {where['path']}` failed {machine.where}: "
                f'{made["error"]}; fix that, or set venv = "..." for {device.name} in {self.cluster.path}'
            )
        python = made["python"]
        wheel = self._copy_wheel(device, machine, where["path"])
        for args in self._pip_steps(device, kind, wheel):
            done = machine.run_script(
                "pip_install",
                {"python": python, "args": args, "timeout": PIP_TIMEOUT_S},
                timeout=PIP_TIMEOUT_S + 60,
            )
            if done["returncode"] != 0:
                raise ConfigError(self._pip_problem(device, machine, facts, args, done["tail"]))
        check = _quiet_probe(self._with_python(device, python))
        if not check or not _runs_this_version(check):
            problem = (check or {}).get(
                "meshllm_error"
            ) or f"missing {', '.join((check or {}).get('missing_modules', []))}"
            raise ConfigError(
                f"device {device.name!r}: meshllm was installed in {where['path']} {machine.where} but does not "
                f"import there ({problem}); see `{python} -m pip check` there"
            )
        ggml = self._add_ggml(device, machine, python, wheel, engine, kind)
        self.state.record_install(device, python, __version__)
        seconds = time.monotonic() - started
        return Installed(
            device.name, python, True,
            f"meshllm {__version__} installed in {where['path']} (python {facts['python']}, torch for {kind}"
            f"{ggml}) in {seconds:.0f} s",
        )  # fmt: skip

    def _add_ggml(
        self, device: Device, machine: Machine, python: str, wheel: str, engine: str | None, kind: str
    ) -> str:
        """The ggml engine (the wheel's `ggml` extra) in the venv where the device computes with it: named
        (`engine = "ggml"`), or by default on a CPU (no GPU, not Apple silicon). What the line printed says of it; ConfigError where
        it was named and did not build. Where it was not named, a failed build leaves the device on torch."""
        if engine != "ggml" and not (engine is None and kind == "cpu"):
            return ""
        done = machine.run_script(
            "pip_install",
            # built anew: a wheel pip kept from an earlier build may lack GGML_BUILD_ENV's flags
            {
                "python": python,
                "args": ["--no-cache-dir", f"{wheel}[ggml]"],
                "timeout": PIP_TIMEOUT_S,
                "env": GGML_BUILD_ENV,
            },
            timeout=PIP_TIMEOUT_S + 60,
        )
        if done["returncode"] == 0:
            return ", the ggml engine"
        why = _build_problem(done["tail"])
        if engine == "ggml":
            raise ConfigError(
                f'device {device.name!r}: the ggml engine (engine = "ggml" in {self.cluster.path}) did not build '
                f"{machine.where}: {why}"
            )
        return (
            f"; the ggml engine did not build there ({why}), so it computes with torch, slower on a CPU: "
            f'with that fixed, set engine = "ggml" for {device.name} and install again'
        )

    def _with_python(self, device: Device, python: str) -> Machine:
        return Machine.of(device.model_copy(update={"python": python}), self.cluster.path)

    def _probe(self, device: Device, machine: Machine, engine: str | None) -> dict[str, Any]:
        try:
            return machine.run_script("probe", {"workdir": device.workdir, "engine": engine}, timeout=60.0)
        except ConfigError as error:
            if "`python` not found" not in str(error) and "`python` is not executable" not in str(error):
                raise  # ssh itself failed: its own message says what to do
            raise ConfigError(
                f"device {device.name!r}: no usable python {machine.where} (tried {device.python!r}); install "
                f"Python {'.'.join(map(str, MIN_PYTHON))}+ there (`sudo apt install python3 python3-venv`; on macOS "
                f'`brew install python@3.12`) or set python = "/path/to/python3" for {device.name} in '
                f"{self.cluster.path}"
            ) from None

    def _check_python(self, device: Device, machine: Machine, facts: dict[str, Any]) -> None:
        version = tuple(int(part) for part in facts["python"].split(".")[:2] if part.isdigit())
        if version < MIN_PYTHON:
            raise ConfigError(
                f"device {device.name!r}: python {facts['python']} ({facts['executable']}) {machine.where} is too old "
                f"for meshllm ({'.'.join(map(str, MIN_PYTHON))}+ needed); install a newer Python there and set "
                f'python = "/path/to/python3.11" for {device.name} in {self.cluster.path}'
            )

    def _check_venv(
        self, device: Device, machine: Machine, facts: dict[str, Any], where: dict[str, Any], needed: int
    ) -> None:
        short = ".".join(facts["python"].split(".")[:2])
        if not where["venv"] or not where["ensurepip"]:
            missing = "venv" if not where["venv"] else "ensurepip"
            raise ConfigError(
                f"device {device.name!r}: python {facts['python']} ({facts['executable']}) {machine.where} cannot "
                f"make a virtual environment (no {missing} module); install it there (`sudo apt install "
                f'python{short}-venv` on Debian/Ubuntu) or set python = "..." for {device.name} in {self.cluster.path}'
            )
        if where["python"] is None and where["free"] is not None and where["free"] < needed:
            raise ConfigError(
                f"device {device.name!r}: only {format_bytes(where['free'])} free at {where['free_at']} {machine.where}, "
                f"a venv with torch needs about {format_bytes(needed)}; free some space there or set "
                f'venv = "/a/bigger/disk/venv" for {device.name} in {self.cluster.path}'
            )

    def _pip_steps(self, device: Device, kind: str, wheel: str) -> list[list[str]]:
        """torch first (from the index for this machine), then the wheel with the rest of its dependencies."""
        index = device.torch_index
        if index is None:
            index = CPU_TORCH_INDEX if kind == "cpu" else ""
        torch_step = [_torch_requirement()] + (["--extra-index-url", index] if index else [])
        package = f"{wheel}[mlx]" if kind == "apple" else wheel
        return [torch_step, [package]]

    def _pip_problem(
        self, device: Device, machine: Machine, facts: dict[str, Any], args: list[str], tail: list[str]
    ) -> str:
        text = "\n".join(tail).lower()
        last = next(
            (line.strip() for line in reversed(tail) if "error" in line.lower()), tail[-1] if tail else ""
        )
        name = f"device {device.name!r}"
        if "no space left" in text or "errno 28" in text:
            return (
                f"{name}: the disk filled up while pip installed {args[0]} {machine.where}; free some space "
                f'there or set venv = "/a/bigger/disk/venv" for {device.name} in {self.cluster.path}'
            )
        unreachable = (
            "failed to establish a new connection", "temporary failure in name resolution", "network is unreachable",
            "could not fetch url", "proxyerror", "max retries exceeded", "connection timed out", "name or service not known",
        )  # fmt: skip
        if any(word in text for word in unreachable):
            last = next(
                line.strip() for line in reversed(tail) if any(word in line.lower() for word in unreachable)
            )
            last = last if len(last) <= 160 else "…" + last[-159:]
            return (
                f"{name}: pip cannot reach a package index {machine.where} ({last}); give that machine access to "
                f"PyPI (a proxy: `pip config set global.proxy ...`) or a mirror (`pip config set global.index-url URL`)"
            )
        if "no matching distribution" in text or "could not find a version" in text:
            platform = f"python {facts['python']} on {facts['platform']}/{facts['machine']}"
            return (
                f"{name}: pip found no {args[0]} for {platform} {machine.where} ({last}); point that machine's pip "
                f"at an index that has it (`pip config set global.index-url URL`), or set torch_index for {device.name}"
            )
        return f"{name}: `pip install {' '.join(args)}` failed {machine.where}: {last or 'no output'}"

    # -- the wheel -------------------------------------------------------------------------------

    def wheel(self) -> Path:
        """A wheel of the running meshllm, built once per run into the state folder."""
        with self._wheel_lock:
            if self._wheel is None:
                self._wheel = build_wheel(self.state.root / "wheels")
            return self._wheel

    def _copy_wheel(self, device: Device, machine: Machine, venv: str) -> str:
        """Put the wheel next to the venv there; its path there."""
        wheel = self.wheel()
        if not device.is_remote:
            return str(wheel)
        folder = f"{venv.rstrip('/')}-wheels"
        target = f"{folder}/{wheel.name}"
        command = f"mkdir -p {shell_word(folder)} && cat > {shell_word(target)}"
        completed = subprocess.run(
            machine.ssh_argv(command), input=wheel.read_bytes(), capture_output=True, timeout=300
        )
        if completed.returncode != 0:
            lines = completed.stderr.decode(errors="replace").strip().splitlines()
            raise ConfigError(
                f"device {device.name!r}: copying {wheel.name} to {target} {machine.where} failed: "
                f"{lines[-1] if lines else f'exit status {completed.returncode}'}"
            )
        return target


def _runs_this_version(facts: dict[str, Any]) -> bool:
    return facts.get("meshllm") == __version__ and not facts.get("missing_modules")


def _quiet_probe(machine: Machine, engine: str | None = None) -> dict[str, Any] | None:
    try:
        return machine.run_script("probe", {"workdir": "~", "engine": engine}, timeout=60.0)
    except ConfigError:
        return None


def _build_problem(tail: list[str]) -> str:
    """Why pip could not build ggml-python, from the last lines of its output, with the fix."""
    text = "\n".join(tail).lower()
    if "compiler" in text and ("not found" in text or "no cmake_c" in text or "could not" in text):
        return (
            "no C/C++ compiler there; install one (`sudo apt install build-essential` on Debian/Ubuntu, "
            "`xcode-select --install` on macOS)"
        )
    if "cmake" in text and ("not found" in text or "no such file" in text):
        return "no cmake there; install it (`sudo apt install cmake`, `brew install cmake`)"
    lines = [line.strip() for line in tail if line.strip()]
    return f"pip said: {lines[-1] if lines else 'nothing'}"


def _torch_requirement() -> str:
    """torch of this machine's release (2.13.0 for 2.13.0+cpu), so every stage computes alike; any 2.4+ without one."""
    try:
        release = importlib.metadata.version("torch").split("+")[0]
    except importlib.metadata.PackageNotFoundError:
        return "torch>=2.4"
    return f"torch=={release}"


# -- building the wheel ------------------------------------------------------------------------------


def build_wheel(folder: Path) -> Path:
    """A wheel of the running meshllm in `folder`: built from its source tree when it runs from one (an
    editable install), else repacked from the installed files."""
    folder.mkdir(parents=True, exist_ok=True)
    source = _source_tree()
    if source is not None:
        return _build_from_source(source, folder)
    return _repack_installed(folder)


def _source_tree() -> Path | None:
    import meshllm

    root = Path(meshllm.__file__).resolve().parents[2]
    pyproject = root / "pyproject.toml"
    if pyproject.is_file() and 'name = "meshllm"' in pyproject.read_text():
        return root
    return None


def _build_from_source(source: Path, folder: Path) -> Path:
    with tempfile.TemporaryDirectory(dir=folder) as scratch:
        completed = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "wheel",
                "--no-deps",
                "--disable-pip-version-check",
                "-q",
                "-w",
                scratch,
                str(source),
            ],
            capture_output=True,
            text=True,
        )
        built = list(Path(scratch).glob("meshllm-*.whl"))
        if completed.returncode != 0 or len(built) != 1:
            lines = [
                line for line in completed.stderr.splitlines() if line.strip() and "is ignored" not in line
            ]
            raise ConfigError(
                f"cannot build a wheel of meshllm from {source}: {lines[-1] if lines else 'pip wheel made none'}"
            )
        wheel = built[0]
        version = wheel.name.split("-")[1]
        if version != __version__:
            raise ConfigError(
                f"the source tree {source} is meshllm {version}, but this is meshllm {__version__}: reinstall it "
                f"(`pip install -e {source}`) before `cluster install`"
            )
        target = folder / wheel.name
        wheel.replace(target)
        return target


def _repack_installed(folder: Path) -> Path:
    """A wheel of the installed distribution's files (its RECORD), with a fresh RECORD of their hashes."""
    distribution = importlib.metadata.distribution("meshllm")
    files = [
        path for path in distribution.files or []
        if not str(path).startswith("..") and "__pycache__" not in str(path) and not str(path).endswith("RECORD")
    ]  # fmt: skip
    dist_info = f"meshllm-{__version__}.dist-info"
    target = folder / f"meshllm-{__version__}-py3-none-any.whl"
    records = []
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in files:
            data = Path(str(path.locate())).read_bytes()
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            archive.writestr(str(path), data)
            records.append(f"{path},sha256={digest},{len(data)}")
        records.append(f"{dist_info}/RECORD,,")
        archive.writestr(f"{dist_info}/RECORD", "\n".join(records) + "\n")
    return target


def with_installed_pythons(cluster: Cluster) -> Cluster:
    """The cluster with each device's python replaced by the venv `cluster install` made there (while
    the file still names the python it was made from)."""
    state = ClusterState(cluster)
    devices = []
    for device in cluster.device:
        python = state.installed_python(device)
        devices.append(device.model_copy(update={"python": python}) if python else device)
    return cluster.model_copy(update={"device": devices})
