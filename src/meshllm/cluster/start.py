"""`meshllm cluster start`: check every device, start the workers, wait for their Health, start the
coordinator, wait for its /health, print the plan and the API's URL.

What already runs and answers is left alone, so a second start says the cluster runs, and a start after
a worker died brings back just that worker (the coordinator watches its workers and loads it again).
A process of ours that runs but does not answer (or no longer matches the file) is stale: `--force`
stops it, by the pid its pid file names; without it, start says so and stops.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from meshllm.cluster import checks, health
from meshllm.cluster.launch import Machine
from meshllm.cluster.logs import read_log_tail
from meshllm.cluster.state import ClusterState, PidRecord
from meshllm.cluster.status import device_entries, format_bytes, format_layers
from meshllm.cluster.stop import stop_record
from meshllm.cluster.tasks import ERROR_INDENT, parallel, parallel_or_raise, raise_all
from meshllm.config import Cluster, Device
from meshllm.defaults import COORDINATOR_STAGE
from meshllm.errors import ConfigError
from meshllm.transport.probe import stage_health


@dataclass(frozen=True)
class Survey:
    up: set[str]  # devices whose process runs and answers where the file says
    stale: list[tuple[PidRecord, str]]  # our processes that run but are not what the file asks for, and why


class Starter:
    def __init__(self, cluster: Cluster, force: bool, timeout: float, echo: Callable[[str], None] = print):
        self.cluster = cluster
        self.state = ClusterState(cluster)
        self.force = force
        self.timeout = timeout
        self.echo = echo
        self.token = self.state.token()
        # Every device's certificates (made here when the file names none), or None: plaintext links.
        self.tls = {device.name: self.state.device_tls(device) for device in cluster.device}
        coordinator_tls = self.tls[cluster.coordinator.name]
        self.client_tls = coordinator_tls.files if coordinator_tls else None  # what this CLI presents
        self.api_key = cluster.cluster.api_key
        self.machines = {device.name: Machine.of(device, cluster.path) for device in cluster.device}

    def run(self) -> int:
        cluster = self.cluster
        if cluster.cluster.insecure:
            self.echo(
                f"warning: {cluster.path}: insecure = true: the links between the stages are plaintext, so "
                "anyone on their network can read the activations and the cluster token, and join; remove "
                "it to have `start` make certificates for mutual TLS"
            )
        survey = self.survey(self.state.records())
        if survey.up == {device.name for device in cluster.device}:
            self.echo(f"cluster {cluster.name!r} is already running: API at {cluster.api_url}/v1")
            return 0
        if survey.stale:
            if not self.force:
                raise_all([ConfigError(reason) for _, reason in survey.stale])
            for record, _ in survey.stale:
                self.echo(f"stopping stale {record.role} {record.device} (pid {record.pid}) …")
                stop_record(self.state, record, str(cluster.path))
        to_start = [device for device in cluster.device if device.name not in survey.up]
        facts = self.check(to_start, coordinator_running=cluster.coordinator.name in survey.up)

        workers = [device for device in to_start if not device.is_coordinator]
        started = parallel_or_raise(lambda device: self.launch(device, facts[device.name]), workers)
        waited = parallel(lambda record: (record, self.wait_worker(record)), started)
        up = []
        for result in waited:
            if not isinstance(result, Exception):
                record, seconds = result
                up.append(record.device)
                self.echo(f"worker {record.device} answers Health in {seconds:.1f} s (pid {record.pid})")
        if up and len(up) < len(waited):
            self.echo(
                f"{', '.join(up)} stay up: once the problem below is fixed, `start` starts just the rest "
                f"(`meshllm cluster stop -c {cluster.path}` stops them)"
            )
        raise_all(waited)

        coordinator = cluster.coordinator
        if coordinator in to_start:
            try:
                record = self.launch(coordinator, facts[coordinator.name])
                seconds = self.wait_coordinator(record)
            except ConfigError:
                if cluster.workers:
                    self.echo(f"the workers stay up (`meshllm cluster stop -c {cluster.path}` stops them)")
                raise
            self.echo(f"coordinator {coordinator.name} healthy in {seconds:.1f} s (pid {record.pid})")
        else:
            self.echo(f"coordinator {coordinator.name} runs; waiting for it to load the restarted workers …")
            record = self.state.records()[coordinator.name]
            seconds = self.wait_coordinator(record)
            self.echo(f"cluster healthy again in {seconds:.1f} s")
        for line in self.load_lines(record, [device.name for device in workers]):
            self.echo(line)
        self.print_plan()
        self.echo(f"API ready at {cluster.api_url}/v1")
        return 0

    # -- what runs already -----------------------------------------------------------------------

    def survey(self, records: dict[str, PidRecord]) -> Survey:
        """Sort the pid files: gone (the file is removed), up, or stale."""
        results = parallel_or_raise(self._classify, records.values())
        up = {name for name, verdict in results if verdict == "up"}
        stale = [(records[name], verdict) for name, verdict in results if verdict not in ("up", "gone")]
        return Survey(up, stale)

    def _classify(self, record: PidRecord) -> tuple[str, str]:
        machine = record.machine_for(str(self.cluster.path))
        if not machine.call("alive", {"pids": [record.pid]})[str(record.pid)]:
            self.state.remove(record.device)
            return record.device, "gone"
        how = f"run `meshllm cluster stop -c {self.cluster.path}` or add --force"
        earlier = f"device {record.device!r}: pid {record.pid} from an earlier start still runs"
        try:
            device = self.cluster.get(record.device)
        except ConfigError:
            return record.device, f"{earlier} but the device is no longer in {self.cluster.path}: {how}"
        expected = self.cluster.dial(device)
        if device.role != record.role or expected != record.address:
            return record.device, f"{earlier} as {record.role} at {record.address}, not at {expected}: {how}"
        report = record.report(str(self.cluster.path))
        if report is not None and report.state == "waiting":
            return record.device, f"{report.problem()} ({how} to start it at once)"
        if record.tls != (self.tls[device.name] is not None):
            was, now = ("with", "without") if record.tls else ("without", "with")
            return record.device, f"{earlier} {was} TLS, but the file now asks for the links {now} it: {how}"
        if device.is_coordinator:
            answered = health.coordinator_health(self.cluster.api_url, self.api_key, timeout=3.0).ok
            what = "/health"
        else:
            probe = stage_health(expected, self.token, timeout=3.0, device=device.name, tls=self.client_tls)
            if probe.refused:
                return record.device, f"{earlier} but refuses this cluster's token: {how}"
            if "TLS" in probe.error or "certificate" in probe.error:  # e.g. started before TLS was on
                return record.device, f"{earlier}, but {probe.error.removeprefix('device ')}: {how}"
            answered, what = probe.ok, "Health"
        if not answered:
            return record.device, f"{earlier} but does not answer {what} at {expected} (hung?): {how}"
        return record.device, "up"

    # -- checks ----------------------------------------------------------------------------------

    def check(self, devices: list[Device], coordinator_running: bool) -> dict[str, dict[str, Any]]:
        """Probe every device to start; raise one ConfigError listing every problem found."""
        cluster = self.cluster
        results = parallel(lambda device: checks.probe(cluster, device, self.machines[device.name]), devices)
        facts = {device.name: result for device, result in zip(devices, results, strict=True)}
        coordinator = cluster.coordinator
        coordinator_version: str | None
        if coordinator_running:
            coordinator_version = self.state.records()[coordinator.name].version
        else:
            found = facts[coordinator.name]
            coordinator_version = None if isinstance(found, Exception) else found.get("meshllm")
        errors: list[Exception] = []
        for device in devices:
            found = facts[device.name]
            if isinstance(found, Exception):
                self.echo(f"checking {device.name} … failed")
                errors.append(found)
                continue
            _, port = cluster.listen(device)
            self.echo(f"checking {device.name} … {checks.summary(device, found, port)}")
            machine = self.machines[device.name]
            errors += [
                ConfigError(problem)
                for problem in checks.problems(cluster, device, machine, found, coordinator_version)
            ]
        raise_all(errors)
        # every device answered: an Exception among the facts is in `errors`
        probed = {name: found for name, found in facts.items() if not isinstance(found, Exception)}
        if not coordinator_running:
            checks.check_memory_fit(
                cluster, {name: found.get("memory_available") for name, found in probed.items()}
            )
        return probed

    # -- starting --------------------------------------------------------------------------------

    def launch(self, device: Device, facts: dict[str, Any]) -> PidRecord:
        """Start the device's process detached there; its pid file is written at once."""
        threads = checks.threads_for(self.cluster, device, facts["cpu_count"])
        alone = checks.threads_alone_for(self.cluster, device, facts["cpu_count"])
        if device.is_coordinator:  # its own stage's threads (a worker's are in worker_argv)
            argv = [*self.coordinator_argv(device), "--threads", str(threads)]
        else:
            argv = self.worker_argv(device, threads)
        argv += ["--threads-alone", str(alone)] if alone else []
        env = {
            **checks.compute_env(self.cluster, device, facts["cpu_count"]),
            "PYTHONUNBUFFERED": "1",
            **device.env,
        }
        machine = self.machines[device.name]
        status_file = None if device.is_coordinator else self.state.status_path(device)
        if status_file is not None:  # a worker runs under its supervisor, which starts it again when it dies
            argv = self.supervisor_argv(device, status_file) + ["--", *argv]
        result = machine.call(
            "launch",
            {
                "argv": argv,
                "cwd": device.workdir,
                "log": self.state.log_path(device),
                "env": env,
                "files": self.files_for(device),
            },
        )
        if "error" in result:
            raise ConfigError(f"device {device.name!r}: cannot start it {machine.where}: {result['error']}")
        tls = self.tls[device.name] is not None
        record = self.state.new_record(
            device, result["pid"], result["log"], facts["meshllm"], status_file, tls=tls
        )
        self.state.write(record)
        return record

    def supervisor_argv(self, device: Device, status_file: str) -> list[str]:
        argv = [device.python, "-m", "meshllm", "supervise", "--name", device.name]
        return argv + ["--status-file", status_file, "--log", self.state.log_path(device)]

    def files_for(self, device: Device) -> dict[str, str]:
        """The files written on the device's machine before its process starts: the token, and its own
        copy of its certificates when it is reached over ssh."""
        tls = self.tls[device.name]
        return {self.state.token_path(device): self.token + "\n", **(tls.to_copy if tls else {})}

    def tls_argv(self, device: Device) -> list[str]:
        """The certificate flags of the device's command; --insecure when the file turns TLS off."""
        tls = self.tls[device.name]
        if tls is not None:
            return tls.argv()
        return ["--insecure"] if self.cluster.cluster.insecure else []

    def worker_argv(self, device: Device, threads: int) -> list[str]:
        bind, port = self.cluster.listen(device)
        argv = [device.python, "-m", "meshllm", "worker", "--host", bind, "--port", str(port)]
        argv += [
            "--name",
            device.name,
            "--token-file",
            self.state.token_path(device),
            "--threads",
            str(threads),
        ]
        argv += self.tls_argv(device)
        argv += ["--step-port", str(device.step_port)] if device.step_port is not None else []
        argv += ["--cores", device.cores] if device.cores else []
        engine = device.engine or self.cluster.cluster.engine
        argv += ["--engine", engine] if engine else []
        return argv + (["--quantize", device.quantize] if device.quantize else [])

    def coordinator_argv(self, device: Device) -> list[str]:
        settings = self.cluster.cluster
        bind, port = self.cluster.listen(device)
        argv = [device.python, "-m", "meshllm", "serve", "--model", settings.model, "--host", bind]
        argv += ["--port", str(port), "--token-file", self.state.token_path(device), *self.tls_argv(device)]
        workers = ",".join(f"{worker.name}={worker.address}" for worker in self.cluster.workers)
        # the supervisors' status files it can read: those of the workers on its own machine
        status = ",".join(
            f"{worker.name}={self.state.status_path(worker)}"
            for worker in self.cluster.workers
            if worker.machine == device.machine
        )
        argv += ["--workers", workers] if workers else ["--stages", "1"]
        if self.cluster.takes_weights:
            weights_port = str(self.cluster.weights_port)
            argv += ["--weights", "cluster", "--weights-port", weights_port]
            argv += ["--weights-address", f"{device.host}:{weights_port}"]
        else:
            argv += ["--weights", "own"]
        own = ",".join(f"{w.name}={w.model_path}" for w in self.cluster.workers if w.model_path)
        memory = ",".join(
            f"{COORDINATOR_STAGE if other.is_coordinator else other.name}={other.memory:g}"
            for other in self.cluster.device
            if other.memory
        )
        optional = {
            "--memory": memory,
            "--device-model": own,
            "--dtype": settings.dtype,
            "--quantize": settings.quantize,
            "--quantize-group": str(settings.quantize_group) if settings.quantize_group else None,
            "--device-quantize": f"{COORDINATOR_STAGE}={device.quantize}" if device.quantize else None,
            "--engine": device.engine or settings.engine,
            "--api-key": settings.api_key,
            "--step-timeout": f"{settings.step_timeout:g}" if settings.step_timeout else None,
            "--replay-timeout": f"{settings.replay_timeout:g}" if settings.replay_timeout else None,
            "--replan-after": f"{settings.replan_after:g}" if settings.replan_after is not None else None,
            "--worker-status": status,
            "--cores": device.cores,
            "--shared-stages": settings.shared_stages,
        }
        for flag, value in optional.items():
            if value:
                argv += [flag, value]
        return argv

    # -- waiting ---------------------------------------------------------------------------------

    def wait_worker(self, record: PidRecord) -> float:
        """Seconds until the worker answers Health; ConfigError when it exits or the time is up."""
        device = self.cluster.get(record.device)
        started = time.monotonic()
        exited = self._exit_watch(device, record)
        while True:
            probe = stage_health(
                device.address, self.token, timeout=2.0, device=device.name, tls=self.client_tls
            )
            if probe.ok:
                return time.monotonic() - started
            if probe.refused:
                raise ConfigError(
                    f"device {device.name!r}: the process answering at {device.address} refuses this "
                    "cluster's token (another cluster's worker on that port?)"
                )
            if "TLS" in probe.error or "certificate" in probe.error:  # no retry mends a handshake
                raise ConfigError(probe.error)
            exited()
            if time.monotonic() - started > self.timeout:
                raise ConfigError(
                    f"device {device.name!r}: no answer to Health at {device.address} within "
                    f"{self.timeout:.0f} s, though its process (pid {record.pid}) runs and listens on "
                    f"{device.listen_host}:{device.port}: is host = {device.host!r} the address this machine "
                    f"reaches it at, and is port {device.port} open in its firewall? "
                    f"(`meshllm cluster logs {device.name} -c {self.cluster.path}`)"
                )
            time.sleep(0.3)

    def wait_coordinator(self, record: PidRecord) -> float:
        """Seconds until /health is 200; ConfigError when the coordinator exits or the time is up."""
        device = self.cluster.coordinator
        started = time.monotonic()
        exited = self._exit_watch(device, record)
        last: str | None = "no answer"
        while True:
            answer = health.coordinator_health(self.cluster.api_url, self.api_key, timeout=3.0)
            if answer.reply is not None:
                if answer.reply.status == 200:
                    return time.monotonic() - started
                body = answer.reply.body
                last = body.get("message") if isinstance(body, dict) else str(body)
            else:
                last = answer.error
            exited()
            if time.monotonic() - started > self.timeout:
                raise ConfigError(
                    f"device {device.name!r}: the coordinator is not healthy after {self.timeout:.0f} s "
                    f"({last}); see `meshllm cluster logs -c {self.cluster.path}`"
                )
            time.sleep(0.5)

    def _exit_watch(self, device: Device, record: PidRecord) -> Callable[[], None]:
        """A check to call while waiting: raises (with the end of the log) once the process has exited.

        Over ssh each look costs a connection, so it looks every 2 s there (every 0.5 s here)."""
        interval = 2.0 if device.is_remote else 0.5
        next_look = time.monotonic() + interval

        def check() -> None:
            nonlocal next_look
            if time.monotonic() >= next_look:
                self._raise_if_exited(device, record)
                next_look = time.monotonic() + interval

        return check

    def _raise_if_exited(self, device: Device, record: PidRecord) -> None:
        """Raise when the process exited, or (a supervised worker) when its worker exited once: a start
        that fails now fails again after every backoff, so the supervisor is stopped and the log shown."""
        machine = self.machines[device.name]
        if machine.call("alive", {"pids": [record.pid]})[str(record.pid)]:
            report = record.report(str(self.cluster.path))
            if report is None or not report.exits:
                return
            stop_record(self.state, record, str(self.cluster.path), grace=3.0)
        self.state.remove(device.name)
        lines = read_log_tail(machine, record.log, 12)
        where = f" on {device.host}" if device.is_remote else ""
        hint = ""
        if any("No module named" in line for line in lines):
            hint = ERROR_INDENT + "Install it there: " + checks.install_command(machine, record.version)
        raise ConfigError(
            f"device {device.name!r}: the {device.role} exited during start. Last lines of {record.log}{where}:"
            + "".join(ERROR_INDENT + "  " + line for line in lines)
            + hint
        )

    def load_lines(self, record: PidRecord, names: list[str]) -> list[str]:
        """The coordinator's one line per worker it loaded (layers, bytes received, seconds), the last of
        each of `names`, from the end of its log."""
        lines = read_log_tail(self.machines[self.cluster.coordinator.name], record.log, 400)
        last: dict[str, str] = {}
        for line in lines:
            name, _, rest = line.partition(": ")
            if name in names and rest.startswith("layers ["):
                last[name] = line
        return ["  " + last[name] for name in names if name in last]

    # -- the plan --------------------------------------------------------------------------------

    def print_plan(self) -> None:
        """Each device's layers and weights, as the coordinator planned and loaded them."""
        gpu_info = health.gpu_info(self.cluster.api_url, self.api_key)
        if gpu_info.problem:
            self.echo(gpu_info.problem)
        entries = device_entries(self.cluster, gpu_info)
        width = max(len(device.name) for device in self.cluster.device)
        for device in [self.cluster.coordinator, *self.cluster.workers]:
            entry = entries.get(device.name)
            if entry:
                layers = f"layers {format_layers(*entry.layers)}"
                weights = format_bytes(entry.weight_bytes)
                self.echo(f"  {device.name:<{width}}  {device.role:<11}  {layers:<16}  {weights}")
