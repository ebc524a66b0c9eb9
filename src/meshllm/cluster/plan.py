"""`meshllm cluster plan`: measure every device and link of the cluster file, print the split a start
would make and the decode speed it should give, beside the fastest device alone.

The workers are started as `cluster start` starts them (and left running: a later `start` uses them);
the coordinator's device runs `meshllm serve --plan-only` with the arguments `start` would give it, so the
plan printed is the plan a start makes. Nothing is loaded.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable

from meshllm.cluster.logs import read_log_tail
from meshllm.cluster.start import Starter
from meshllm.cluster.tasks import parallel, parallel_or_raise, raise_all
from meshllm.config import Cluster
from meshllm.errors import ConfigError

# The lines `serve --plan-only` prints (log lines carry a timestamp first).
_PLAN_LINES = ("plan: ", "device speeds: ", "link ", "predicted decode: ", "no prediction: ")


def show_plan(cluster: Cluster, timeout: float, echo: Callable[[str], None] = print) -> int:
    starter = Starter(cluster, force=False, timeout=timeout, echo=echo)
    survey = starter.survey(starter.state.records())
    coordinator = cluster.coordinator
    if coordinator.name in survey.up:
        raise ConfigError(
            f"cluster {cluster.name!r} is running: a plan measures idle devices; stop it first "
            f"(`meshllm cluster stop -c {cluster.path}`)"
        )
    if survey.stale:
        raise_all([ConfigError(reason) for _, reason in survey.stale])
    to_start = [device for device in cluster.workers if device.name not in survey.up]
    facts = starter.check([*to_start, coordinator], coordinator_running=False)
    started = parallel_or_raise(lambda device: starter.launch(device, facts[device.name]), to_start)
    raise_all([result for result in parallel(starter.wait_worker, started) if isinstance(result, Exception)])
    if to_start:
        echo(
            f"workers {', '.join(device.name for device in to_start)} started "
            f"(`meshllm cluster start -c {cluster.path}` uses them; `cluster stop` stops them)"
        )
    echo(f"measuring {len(cluster.device)} devices and their links …")
    lines = _run_plan(starter, facts[coordinator.name], timeout)
    for line in lines:
        echo(line)
    return 0


def _run_plan(starter: Starter, facts: dict, timeout: float) -> list[str]:
    """Run `serve --plan-only` on the coordinator's device, wait for it, and return what it printed."""
    cluster, device = starter.cluster, starter.cluster.coordinator
    machine = starter.machines[device.name]
    log = starter.state.log_path(device).removesuffix(".log") + ".plan.log"
    argv = [*starter.coordinator_argv(device), "--plan-only"]
    threads = facts.get("cpu_count") or 1
    result = machine.call(
        "launch",
        {
            "argv": argv,
            "cwd": device.workdir,
            "log": log,
            "env": {"OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1", **device.env},
            "files": starter.files_for(device),
        },
    )
    if "error" in result:
        raise ConfigError(f"device {device.name!r}: cannot run the plan {machine.where}: {result['error']}")
    pid, deadline = result["pid"], time.monotonic() + timeout
    while machine.call("alive", {"pids": [pid]})[str(pid)]:
        if time.monotonic() > deadline:
            machine.call("stop", {"pid": pid, "timeout": 5.0})
            raise ConfigError(f"device {device.name!r}: the plan took longer than {timeout:.0f} s; see {log}")
        time.sleep(0.5)
    output = read_log_tail(machine, result["log"], 200)
    lines = [line for line in output if line.startswith(_PLAN_LINES)]
    if not any(line.startswith("plan: ") for line in lines):
        status = machine.call("exit_status", {"pid": pid})["status"]
        raise ConfigError(
            f"device {device.name!r}: the plan failed{_how_it_ended(status)}. "
            + (f"Last lines of {log}:\n  " + "\n  ".join(output[-12:]) if output else f"{log} is empty.")
            + f"\n(`meshllm cluster logs -c {cluster.path}` shows the workers' logs)"
        )
    return lines


def _how_it_ended(status: int | None) -> str:
    """How the plan's process ended, where known (it is known where this process started it)."""
    if status is None:
        return ""
    if status >= 0:
        return f" (exit status {status})"
    try:
        name = signal.Signals(-status).name
    except ValueError:
        name = f"signal {-status}"
    hint = ": out of memory?" if -status == signal.SIGKILL else ""
    return f" (killed by {name}{hint})"
