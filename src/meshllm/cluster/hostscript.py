"""What runs on a device's machine: probe it, start a detached process, stop one, report ports, tail logs,
read a supervisor's status file, and make a venv and pip install into it (`cluster install`).

Standard library only, because meshllm may be missing there (finding that out is the probe's job). The
cluster commands send this file's source to `PYTHON -` over ssh with one call appended (see
`launch.Machine`); for local devices they call these functions directly. The result is printed as one
line `RESULT_MARKER + json`. The syntax stays readable by old Pythons so the probe can report them.
"""

import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time

RESULT_MARKER = "@@meshllm-result "
# The processes `launch` started from this process, by pid: where it is their parent (a local device),
# `exit_status` can say how one ended. Over ssh the launching script is gone before they end.
_LAUNCHED = {}  # type: dict[int, subprocess.Popen[bytes]]
REQUIRED_MODULES = ("grpc", "google.protobuf", "numpy", "safetensors", "tokenizers", "pydantic")
ENGINE_MODULES = {
    "mlx": ("mlx",),
    "torch": ("torch",),
    "ggml": ("ggml", "gguf"),
}  # what an engine named needs


def probe(workdir, model=None, engine=None, port=None, bind=None):
    """What this machine offers: Python, meshllm (and its dependencies), memory, cores, the port, the model."""
    workdir = os.path.expanduser(workdir)
    result = {
        "python": platform.python_version(),
        "executable": sys.executable,
        "hostname": socket.gethostname(),
        "cpu_count": os.cpu_count() or 1,
        "platform": sys.platform,
        "machine": platform.machine(),
        "workdir": workdir,
        "meshllm": None,
        "meshllm_error": None,
        "missing_modules": [],
        "memory_total": None,
        "memory_available": None,
    }
    try:
        import meshllm

        result["meshllm"] = meshllm.__version__
    except Exception as error:  # ImportError, or a broken install failing in its own way
        result["meshllm_error"] = f"{type(error).__name__}: {error}"
    if result["meshllm"]:
        import importlib.util

        wanted = REQUIRED_MODULES + ENGINE_MODULES.get(engine, ())
        result["missing_modules"] = [name for name in wanted if _find_spec(importlib.util, name) is None]
        try:
            from meshllm.devices import system_memory

            result["memory_total"], result["memory_available"] = system_memory()
        except Exception:  # an older meshllm: the version check reports it
            pass
    if port:
        result["port"] = port_state(port, bind or "0.0.0.0")
    if model:
        result["model"] = model_state(model, workdir)
    return result


def _find_spec(util, name):
    try:
        return util.find_spec(name)
    except (ImportError, ValueError):
        return None


def model_state(model, workdir):
    """Whether `model` is a folder (or a GGUF file) here, relative to workdir, a hub id, or the built-in demo."""
    if model == "demo":
        return {"kind": "demo"}
    path = os.path.join(workdir, os.path.expanduser(model))
    if os.path.exists(path):
        is_checkpoint = os.path.isfile(os.path.join(path, "config.json")) or (
            path.endswith(".gguf") and os.path.isfile(path)
        )
        return {"kind": "folder", "path": os.path.abspath(path), "exists": True, "checkpoint": is_checkpoint}
    if model.startswith((".", "/", "~")) or model.count("/") != 1:
        return {"kind": "folder", "path": os.path.abspath(path), "exists": False, "checkpoint": False}
    return {"kind": "hub"}


def port_state(port, bind="0.0.0.0"):
    """{"free": bool, "holders": [{"pid", "command"}]}: can a server listen on bind:port, and who holds it."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            bind, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as error:
        return {"free": False, "holders": [], "error": f"cannot resolve {bind}: {error}"}
    sock = socket.socket(family, kind, proto)
    try:
        # As a server would (it may rebind over TIME_WAIT), but without SO_REUSEPORT: another listener fails it.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(1)
        return {"free": True, "holders": []}
    except OSError as error:
        holders = [{"pid": pid, "command": process_command(pid)} for pid in listening_pids(port)]
        return {"free": False, "holders": holders, "error": error.strerror or str(error)}
    finally:
        sock.close()


def listening_pids(port):
    """Pids of the processes listening on TCP `port`: /proc on Linux, else lsof when installed."""
    if os.path.exists("/proc/net/tcp"):
        inodes = set()
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            try:
                with open(table) as handle:
                    next(handle)
                    for line in handle:
                        fields = line.split()
                        local, state, inode = fields[1], fields[3], fields[9]
                        if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                            inodes.add(f"socket:[{inode}]")
            except OSError:
                continue
        pids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                fds = os.listdir(f"/proc/{entry}/fd")
            except OSError:  # gone, or another user's
                continue
            for fd in fds:
                try:
                    if os.readlink(f"/proc/{entry}/fd/{fd}") in inodes:
                        pids.append(int(entry))
                        break
                except OSError:
                    continue
        return sorted(pids)
    try:
        output = subprocess.run(
            ["lsof", "-nP", "-t", f"-iTCP:{port}", "-sTCP:LISTEN"], capture_output=True, text=True, timeout=10
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return sorted({int(line) for line in output.split() if line.isdigit()})


def process_command(pid):
    """The command line of `pid`, or "" when it is gone or unreadable."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        pass
    try:
        return subprocess.run(
            ["ps", "-o", "command=", "-p", str(pid)], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def is_alive(pid):
    """True while `pid` runs; a zombie (exited, not yet reaped) counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        pass
    try:
        state = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True).stdout
    except OSError:
        return True
    return bool(state.strip()) and not state.strip().startswith("Z")


def is_ours(pid):
    """A live process started as `python -m meshllm ...` (a pid file's pid may have been reused since)."""
    return is_alive(pid) and "meshllm" in process_command(pid)


def alive(pids):
    return {str(pid): is_ours(pid) for pid in pids}


def launch(argv, cwd, log, env=None, files=None):
    """Start `argv` detached (its own session, stdin from /dev/null, output to `log`); returns its pid.

    `files` ({path: text}) are written first, readable by this user only (the cluster token,
    the device's certificates and key).
    The previous log is kept as `log + ".1"`.
    """
    cwd = os.path.expanduser(cwd)
    try:
        os.makedirs(cwd, exist_ok=True)
        log = os.path.abspath(os.path.join(cwd, os.path.expanduser(log)))
        os.makedirs(os.path.dirname(log), exist_ok=True)
        if os.path.exists(log):
            os.replace(log, log + ".1")
        for path, text in (files or {}).items():
            path = os.path.join(cwd, os.path.expanduser(path))
            os.makedirs(os.path.dirname(path), exist_ok=True)
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.fchmod(descriptor, 0o600)  # also when the file was there before with wider rights
            with os.fdopen(descriptor, "w") as handle:
                handle.write(text)
        environment = dict(os.environ)
        environment.update(env or {})
        argv = [os.path.expanduser(argv[0])] + list(argv[1:])
        with open(log, "ab") as output:
            process = subprocess.Popen(
                argv,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                env=environment,
                start_new_session=True,  # no SIGHUP when ssh or the terminal goes; killpg stops it all
                close_fds=True,
            )
    except OSError as error:
        return {"error": f"{getattr(error, 'filename', None) or argv[0]}: {error.strerror or error}"}
    _LAUNCHED[process.pid] = process
    return {"pid": process.pid, "log": log, "hostname": socket.gethostname()}


def exit_status(pid):
    """{"status": how a process `launch` started here ended (its exit code, or minus the signal that
    killed it)}; None while it runs, or where this process did not start it."""
    process = _LAUNCHED.get(pid)
    return {"status": None if process is None else process.poll()}


def stop(pid, timeout=10.0, port=None, bind=None):
    """SIGTERM to the process group of `pid`, SIGKILL after `timeout` s; then whether its port is free.

    Only a live meshllm process is signalled: a pid file may name a pid the system has reused since.
    """
    result = {"state": "not running"}
    if is_ours(pid):
        _signal_group(pid, signal.SIGTERM)
        _signal_group(pid, signal.SIGCONT)  # a stopped (SIGSTOP) process must run to handle SIGTERM
        result["state"] = "stopped"
        if not _wait_gone(pid, timeout):
            _signal_group(pid, signal.SIGKILL)
            result["state"] = "killed" if _wait_gone(pid, 5.0) else "still running"
        _signal_group(pid, signal.SIGKILL)  # whatever of its group outlived it
    if port:
        deadline = time.monotonic() + 5.0
        result["port"] = port_state(port, bind or "0.0.0.0")
        while not result["port"]["free"] and time.monotonic() < deadline:
            time.sleep(0.2)
            result["port"] = port_state(port, bind or "0.0.0.0")
    return result


def _signal_group(pid, signum):
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, signum)
        else:
            os.kill(pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def _wait_gone(pid, timeout):
    deadline = time.monotonic() + timeout
    while is_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def tail(path, lines=20, follow=False, out=None):
    """Print the last `lines` lines of `path`; with `follow`, keep printing what is appended (until killed)."""
    out = out or sys.stdout
    path = os.path.expanduser(path)
    position, identity = 0, None
    try:
        with open(path, "rb") as handle:
            data = handle.read()
            identity = os.fstat(handle.fileno()).st_ino
        position = len(data)
        last = data.decode(errors="replace").splitlines()[-lines:] if lines > 0 else []
        for line in last:
            out.write(line + "\n")
        out.flush()
    except OSError as error:
        if not follow:
            out.write(f"(no log at {path}: {error.strerror})\n")
            return
    parent = os.getppid()
    while follow and os.getppid() == parent:  # over ssh, the parent goes when the connection does
        time.sleep(0.3)
        try:
            with open(path, "rb") as handle:
                status = os.fstat(handle.fileno())
                if status.st_ino != identity or status.st_size < position:  # a new start rotated it
                    identity, position = status.st_ino, 0
                handle.seek(position)
                data = handle.read()
        except OSError:
            continue
        if data:
            complete = data[: data.rfind(b"\n") + 1]
            position += len(complete)
            out.write(complete.decode(errors="replace"))
            out.flush()


def read_json(path):
    """{"content": the JSON object in `path`} or {"content": None} when it is missing or unreadable."""
    try:
        with open(os.path.expanduser(path)) as handle:
            return {"content": json.load(handle)}
    except (OSError, ValueError):
        return {"content": None}


def venv_check(path):
    """Can this python make a venv at `path`: its venv and ensurepip modules, the free disk there, and
    whether the machine has an NVIDIA driver (torch's CUDA build) or is Apple silicon (mlx)."""
    import shutil

    path = os.path.abspath(os.path.expanduser(path))
    existing = path
    while not os.path.exists(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    result = {"path": path, "free_at": existing, "free": None, "venv": True, "ensurepip": True}
    for name in ("venv", "ensurepip"):
        try:
            __import__(name)
        except ImportError:
            result[name] = False
    try:
        result["free"] = shutil.disk_usage(existing).free
    except OSError:
        pass
    result["nvidia"] = os.path.exists("/proc/driver/nvidia/version") or bool(shutil.which("nvidia-smi"))
    python = os.path.join(path, "bin", "python")
    result["python"] = python if os.access(python, os.X_OK) else None
    return result


def make_venv(path):
    """`python -m venv path` (kept when one is there); {"python": its interpreter} or {"error": why}."""
    path = os.path.abspath(os.path.expanduser(path))
    python = os.path.join(path, "bin", "python")
    if not os.access(python, os.X_OK):
        try:
            completed = subprocess.run(
                [sys.executable, "-m", "venv", path], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
            )
        except OSError as error:
            return {"error": str(error)}
        if completed.returncode != 0:
            lines = [line for line in completed.stdout.decode(errors="replace").splitlines() if line.strip()]
            return {"error": lines[-1].strip() if lines else "exit status " + str(completed.returncode)}
    return {"python": python}


def pip_install(python, args, timeout=1800, env=None):
    """`python -m pip install ARGS` (with `env` added to the environment): its exit status and the last
    lines of its output."""
    argv = [os.path.expanduser(python), "-m", "pip", "install", "--disable-pip-version-check", "--no-input"]
    argv += ["--progress-bar", "off"] + [os.path.expanduser(arg) for arg in args]
    try:
        environment = dict(os.environ, **(env or {}))
        completed = subprocess.run(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout, env=environment
        )
    except subprocess.TimeoutExpired:
        return {"returncode": -1, "tail": ["pip did not finish within " + str(int(timeout)) + " s"]}
    except OSError as error:
        return {"returncode": -1, "tail": [str(error)]}
    lines = [line for line in completed.stdout.decode(errors="replace").splitlines() if line.strip()]
    return {"returncode": completed.returncode, "tail": lines[-40:]}


ACTIONS = {
    "probe": probe,
    "launch": launch,
    "stop": stop,
    "alive": alive,
    "exit_status": exit_status,
    "read_json": read_json,
    "venv_check": venv_check,
    "make_venv": make_venv,
    "pip_install": pip_install,
}


def main(action, params):
    """Entry point when this file is sent to `python -`: run one action and print its result line."""
    if sys.path and sys.path[0] == "":  # a `meshllm` folder in the current one must not shadow the install
        sys.path.pop(0)
    if action == "tail":
        tail(**params)
        return
    result = ACTIONS[action](**params)
    sys.stdout.write("\n" + RESULT_MARKER + json.dumps(result) + "\n")
    sys.stdout.flush()
