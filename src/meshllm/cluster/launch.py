"""Where a device's processes run, and how they are reached: this machine, or another one over ssh.

Every action is a function of `hostscript`: local devices call it in this process (except the probe,
which must run under the device's own `python`); ssh devices send the script to `PYTHON -` over
`ssh -o BatchMode=yes -o ConnectTimeout=5 TARGET`. A failure to get there at all (host unreachable, ssh
refused, `python` not found) is raised as a ConfigError naming the device and the fix.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from meshllm.cluster import hostscript
from meshllm.config import Device
from meshllm.errors import ConfigError

SSH_CONNECT_TIMEOUT_S = 5
# Options that make ssh fail at once with a message instead of waiting for a password or a "yes".
SSH_BASE_OPTIONS = ("BatchMode=yes", f"ConnectTimeout={SSH_CONNECT_TIMEOUT_S}", "ServerAliveInterval=5")


@dataclass(frozen=True)
class Machine:
    """How to run things where one device lives. Kept in its pid file, so `stop` works from that alone."""

    device: str
    config_file: str  # named in the fixes messages suggest
    python: str
    ssh: str | None = None
    ssh_port: int | None = None
    ssh_key: str | None = None
    ssh_options: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, device: Device, config_file: str | Path) -> Machine:
        return cls(
            device=device.name,
            config_file=str(config_file),
            python=device.python,
            ssh=device.ssh,
            ssh_port=device.ssh_port,
            ssh_key=device.ssh_key,
            ssh_options=tuple(device.ssh_options),
            env=dict(device.env),
        )

    def to_record(self) -> dict[str, Any]:
        return {
            "python": self.python,
            "ssh": self.ssh,
            "ssh_port": self.ssh_port,
            "ssh_key": self.ssh_key,
            "ssh_options": list(self.ssh_options),
        }

    @classmethod
    def from_record(cls, device: str, config_file: str, record: dict[str, Any]) -> Machine:
        return cls(
            device=device,
            config_file=config_file,
            python=record["python"],
            ssh=record.get("ssh"),
            ssh_port=record.get("ssh_port"),
            ssh_key=record.get("ssh_key"),
            ssh_options=tuple(record.get("ssh_options") or ()),
        )

    @property
    def is_remote(self) -> bool:
        return self.ssh is not None

    @property
    def where(self) -> str:
        """For messages: 'on me@mini2 over ssh' or 'on this machine'."""
        return f"on {self.ssh} over ssh" if self.ssh else "on this machine"

    # -- running things there ------------------------------------------------------------------------

    def ssh_argv(self, remote_command: str) -> list[str]:
        """`ssh [options] TARGET remote_command`; the remote login shell runs remote_command."""
        assert self.ssh is not None
        argv = ["ssh"]
        for option in (*SSH_BASE_OPTIONS, *self.ssh_options):
            argv += ["-o", option]
        if self.ssh_port:
            argv += ["-p", str(self.ssh_port)]
        if self.ssh_key:
            argv += ["-i", os.path.expanduser(self.ssh_key), "-o", "IdentitiesOnly=yes"]
        return [*argv, self.ssh, remote_command]

    def python_argv(self) -> list[str]:
        """The command that runs `python -` (a script on stdin) there, with the device's env."""
        if not self.ssh:
            return [os.path.expanduser(self.python), "-"]
        env = [shlex.quote(f"{key}={value}") for key, value in self.env.items()]
        words = (["env", *env] if env else []) + [shell_word(self.python), "-"]
        return self.ssh_argv(" ".join(words))

    def run_script(self, action: str, params: dict[str, Any], timeout: float = 60.0) -> dict[str, Any]:
        """Run one hostscript action under this device's python (there) and return its result."""
        script = _script(action, params)
        environment = None if self.ssh else {**os.environ, **self.env}
        try:
            completed = subprocess.run(
                self.python_argv(),
                input=script,
                capture_output=True,
                text=True,
                timeout=timeout,
                env=environment,
            )
        except FileNotFoundError as error:
            if self.ssh:
                raise ConfigError(
                    f"device {self.device!r}: no `ssh` command on this machine; install OpenSSH's client"
                ) from None
            raise self._python_missing(str(error.filename or self.python)) from None
        except PermissionError:
            raise self._python_missing(self.python, "is not executable") from None
        except subprocess.TimeoutExpired:
            raise ConfigError(
                f"device {self.device!r}: no answer {self.where} within {timeout:.0f} s "
                f"(is the machine overloaded, or is `python` waiting for input?)"
            ) from None
        for line in reversed(completed.stdout.splitlines()):
            if line.startswith(hostscript.RESULT_MARKER):
                return json.loads(line[len(hostscript.RESULT_MARKER) :])
        raise self._explain_failure(completed.returncode, completed.stderr)

    def call(self, action: str, params: dict[str, Any], timeout: float = 60.0) -> dict[str, Any]:
        """Like run_script, but local devices run the action in this process (quicker, same result)."""
        if self.ssh:
            return self.run_script(action, params, timeout)
        # hostscript stays unannotated (old Pythons read it): its functions join to the type `function`
        run_action = cast(Callable[..., Any], hostscript.ACTIONS[action])
        result = run_action(**params)
        return json.loads(json.dumps(result))  # the same shape (string keys) as over ssh

    def tail(self, path: str, lines: int, follow: bool) -> subprocess.Popen[str]:
        """A process printing the last lines of a log there (and, with `follow`, what is appended)."""
        argv = self.python_argv() if self.ssh else [sys.executable, "-"]
        process = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        assert process.stdin is not None
        process.stdin.write(_script("tail", {"path": path, "lines": lines, "follow": follow}))
        process.stdin.close()
        return process

    # -- explaining failures -------------------------------------------------------------------------

    def _python_missing(self, tried: str, problem: str = "not found") -> ConfigError:
        suggestion = self._suggest_python()
        return ConfigError(
            f"device {self.device!r}: `python` {problem} {self.where} (tried {tried!r}); set "
            f'python = "{suggestion}" for {self.device} in {self.config_file}'
        )

    def _suggest_python(self) -> str:
        """An interpreter to propose: the first one there that imports meshllm, else a placeholder."""
        if not self.ssh:
            return sys.executable
        candidates = '~/*/.venv/bin/python ~/.venv/bin/python ~/*/venv/bin/python "$(command -v python3)"'
        look = f'for p in {candidates}; do [ -x "$p" ] && "$p" -c "import meshllm" 2>/dev/null && echo "$p" && break; done'
        try:
            found = subprocess.run(
                self.ssh_argv(f"sh -c {shlex.quote(look)}"), capture_output=True, text=True, timeout=30
            ).stdout.split()
        except (OSError, subprocess.TimeoutExpired):
            found = []
        return found[0] if found else "/path/to/meshllm/.venv/bin/python"

    def _explain_failure(self, returncode: int, stderr: str) -> ConfigError:
        lines = [line.strip() for line in stderr.strip().splitlines() if line.strip()]
        last = lines[-1] if lines else f"exit status {returncode}"
        if self.ssh and returncode == 255:
            return ConfigError(f"device {self.device!r}: {explain_ssh_error(self.ssh, stderr)}")
        if self.ssh and returncode in (126, 127):
            problem = "is not executable" if returncode == 126 else "not found"
            return self._python_missing(self.python, problem)
        return ConfigError(f"device {self.device!r}: python {self.python!r} failed {self.where}: {last}")


def explain_ssh_error(target: str, stderr: str) -> str:
    """One line saying why ssh could not run a command on `target`, and what to do."""
    host = target.rsplit("@", 1)[-1]
    text = stderr.lower()
    if "could not resolve hostname" in text or "name or service not known" in text:
        return f"host {host!r} is unreachable: its name does not resolve (check it, or use its IP address)"
    if "connection refused" in text:
        return (
            f"ssh to {target} was refused: no ssh server answers on {host} "
            "(start it: `sudo systemctl enable --now ssh` on Linux, Remote Login on macOS)"
        )
    if any(
        word in text for word in ("timed out", "no route to host", "network is unreachable", "host is down")
    ):
        return f"host {host!r} is unreachable (no answer within {SSH_CONNECT_TIMEOUT_S} s): is it on, and on this network?"
    if "permission denied" in text or "too many authentication failures" in text:
        return (
            f"ssh to {target} asks for a password or refuses the key (the cluster runs ssh with BatchMode=yes): "
            f"install a key with `ssh-copy-id {target}`, or set ssh_key"
        )
    if "host key verification failed" in text or "remote host identification has changed" in text:
        return f"the host key of {host} is unknown or changed: run `ssh {target}` once to check and accept it"
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    return f"ssh to {target} failed: {lines[-1].strip() if lines else 'no message'}"


def shell_word(path: str) -> str:
    """Quote `path` for a POSIX shell, leaving a leading `~/` for the shell there to expand."""
    if path.startswith("~/"):
        return "~/" + shlex.quote(path[2:])
    return shlex.quote(path)


def _script(action: str, params: dict[str, Any]) -> str:
    call = f"\nif __name__ == '__main__':\n    main({action!r}, json.loads({json.dumps(params)!r}))\n"
    return Path(hostscript.__file__).read_text() + call
