"""`meshllm cluster stop`: the coordinator first, then the workers; only the pids our pid files name.

Each process group gets SIGTERM, then SIGKILL if it is still there after the grace period; then its
port must be free. Pid files of processes that are gone are removed, so stopping twice is harmless.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from meshllm.cluster.state import ClusterState, PidRecord
from meshllm.cluster.tasks import parallel
from meshllm.config import Cluster
from meshllm.errors import ConfigError

GRACE_S = 10.0


@dataclass(frozen=True)
class Stopped:
    record: PidRecord
    state: str  # "stopped" | "killed" | "not running" | "still running"
    port_holders: list[str]  # "pid 123 (command)" of whatever still listens on its port

    @property
    def ok(self) -> bool:
        return self.state != "still running" and not self.port_holders


def stop_record(state: ClusterState, record: PidRecord, config_file: str, grace: float = GRACE_S) -> Stopped:
    """Stop one recorded process (its whole process group) and remove its pid file once it is gone."""
    machine = record.machine_for(config_file)
    params = {"pid": record.pid, "timeout": grace, "port": record.port, "bind": record.listen}
    result = machine.call("stop", params, timeout=grace + 30.0)
    if result["state"] != "still running":
        state.remove(record.device)
    port = result.get("port") or {"free": True}
    holders = [f"pid {holder['pid']} ({holder['command']})" for holder in port.get("holders", [])]
    if not port["free"] and not holders:
        holders = ["a process this user cannot see"]
    return Stopped(record, result["state"], holders)


def stop_cluster(cluster: Cluster, grace: float = GRACE_S, echo: Callable[[str], None] = print) -> int:
    state = ClusterState(cluster)
    records = state.records()
    if not records:
        echo(f"cluster {cluster.name!r} is not running (no pid files in {state.pid_dir})")
        return 0
    # The coordinator first: it must not watch its workers vanish and report them as failures.
    first = [record for record in records.values() if record.role == "coordinator"]
    rest = [record for record in records.values() if record.role != "coordinator"]
    failures = 0
    for batch in (first, rest):
        outcomes = parallel(lambda record: stop_record(state, record, str(cluster.path), grace), batch)
        for record, outcome in zip(batch, outcomes, strict=True):
            label = f"{record.role} {record.device} (pid {record.pid})"
            if isinstance(outcome, ConfigError):  # its machine is out of reach: the pid file stays
                echo(f"{label}: could not stop it: {outcome}")
                failures += 1
                continue
            if isinstance(outcome, Exception):
                raise outcome
            echo(f"{label}: {_describe(outcome.state, grace)}")
            if outcome.port_holders:
                host = record.address.rsplit(":", 1)[0]
                echo(f"  port {record.port} on {host} is still in use by {', '.join(outcome.port_holders)}")
            failures += not outcome.ok
    return 1 if failures else 0


def _describe(state: str, grace: float) -> str:
    return {
        "stopped": "stopped",
        "killed": f"killed (it did not exit within {grace:.0f} s of SIGTERM)",
        "not running": "was not running (pid file removed)",
        "still running": "still running after SIGKILL",
    }[state]
