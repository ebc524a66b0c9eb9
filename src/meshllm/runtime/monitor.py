"""The coordinator's watch over its devices: each one's status (the rows of /distributed/gpu-info and
the answer of /health), refreshed about once a second, the reload of a worker that came back
without its layers (it was restarted), and how long each has been unreachable (for the re-plan)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping

from meshllm.devices import DeviceStatus, describe_host
from meshllm.errors import StageError
from meshllm.runtime.backoff import Backoff
from meshllm.runtime.stage_host import LocalStageHost
from meshllm.step import LayerRange
from meshllm.transport.rpc import VERSION
from meshllm.transport.stage_client import StageClient

log = logging.getLogger(__name__)


class DeviceMonitor:
    def __init__(
        self,
        model: str,
        local_name: str,
        local: list[LocalStageHost],
        workers: list[tuple[StageClient, LayerRange | None]],  # in chain order, the range each should hold
        reload: Callable[[StageClient], Awaitable[None]],
        device_models: Mapping[str, str] | None = None,  # a worker's own copy: the name it loads it by
    ) -> None:
        self.model = model
        self.device_models = dict(device_models or {})
        self.local_name = local_name
        self.local = local
        self.workers = workers
        self._reload_worker = reload
        self._status: dict[str, DeviceStatus] = {}
        self._reloads: dict[str, asyncio.Task[None]] = {}  # kept, so a reload is never collected mid-way
        self._reload_backoff: dict[str, Backoff] = {}
        self._reload_at: dict[str, float] = {}  # a failed reload is tried again from then on
        self._notes: dict[str, str] = {}  # what else is known of a device that is down (e.g. how it exited)
        self._watch: asyncio.Task[None] | None = None
        self._down_since: dict[str, float] = {}  # devices unreachable since (monotonic seconds)
        # Called after each look at the devices (the re-plan decides there); awaited before the next look.
        self.after_refresh: Callable[[], Awaitable[None]] | None = None
        self.cannot_replan = ""  # why the layers could not be planned without a device that stays down

    # ---- status --------------------------------------------------------------------------------

    def _local_status(self) -> list[DeviceStatus]:
        statuses = []
        for index, host in enumerate(self.local):
            stage = host.stage
            assert stage is not None  # the coordinator's own stages are loaded before it serves
            device = describe_host(stage.device_type)
            statuses.append(
                DeviceStatus(
                    device_id=index,
                    name=self.local_name,
                    hostname=device.hostname,
                    address="local",
                    role="coordinator",
                    status="healthy",
                    engine=stage.engine,
                    device_type=device.device_type,
                    memory_total=device.memory_total,
                    memory_available=device.memory_available,
                    weight_bytes=stage.weight_bytes(),
                    layers=stage.layer_range,
                    live_sequences=stage.live_sequences(),
                    rtt_ms=None,
                    version=VERSION,
                    quantize=host.quantize or "",
                )
            )
        return statuses

    async def _worker_status(
        self, device_id: int, client: StageClient, planned: LayerRange | None
    ) -> DeviceStatus:
        started = time.perf_counter()
        in_plan = planned is not None
        left_out = "" if in_plan else f"; left out of the layer plan: {self.left_out_note()}"
        try:
            info = await client.info(timeout=2.0)
        except StageError as error:
            self._down_since.setdefault(client.name, time.monotonic())
            previous = self._status.get(client.name)
            note = self._notes.get(client.name)
            if note:
                error = StageError(f"{error}; {note}")
            if in_plan and self.cannot_replan:
                error = StageError(f"{error}; {self.cannot_replan}")
            return DeviceStatus(
                device_id=device_id, name=client.name, hostname=previous.hostname if previous else "",
                address=client.address, role="worker", status="unreachable",
                engine=previous.engine if previous else "", device_type=previous.device_type if previous else "",
                memory_total=0, memory_available=0, weight_bytes=0, layers=planned or LayerRange(0, 0),
                live_sequences=0, rtt_ms=None, version="", error=f"{error}{left_out}", in_plan=in_plan,
            )  # fmt: skip
        rtt_ms = (time.perf_counter() - started) * 1000
        self._notes.pop(client.name, None)  # it answers again
        self._down_since.pop(client.name, None)
        if planned is None:
            return DeviceStatus(
                device_id=device_id, name=client.name, hostname=info.hostname, address=client.address,
                role="worker", status="not loaded", engine=info.engine, device_type=info.device_type,
                memory_total=info.memory_total, memory_available=info.memory_available,
                weight_bytes=info.weight_bytes, layers=LayerRange(0, 0), live_sequences=info.live_sequences,
                rtt_ms=round(rtt_ms, 3), version=info.version, quantize=info.quantize, in_plan=False,
                error=f"device '{client.name}' answers again; it rejoins the layer plan once no request is "
                "running",
            )  # fmt: skip
        loaded = info.model == self.device_models.get(client.name, self.model) and info.layers == planned
        return DeviceStatus(
            device_id=device_id,
            name=client.name,
            hostname=info.hostname,
            address=client.address,
            role="worker",
            status="healthy" if loaded else "not loaded",
            engine=info.engine,
            device_type=info.device_type,
            memory_total=info.memory_total,
            memory_available=info.memory_available,
            weight_bytes=info.weight_bytes,
            layers=planned,
            live_sequences=info.live_sequences,
            rtt_ms=round(rtt_ms, 3),
            version=info.version,
            error="" if loaded else f"device '{client.name}' has not loaded its layers",
            quantize=info.quantize,
        )

    async def refresh(self) -> list[DeviceStatus]:
        """Ask every device now; also refreshes the snapshot the health check reads."""
        offset, workers = len(self.local), self.workers
        remote = await asyncio.gather(
            *(self._worker_status(offset + i, client, planned) for i, (client, planned) in enumerate(workers))
        )
        statuses = self._local_status() + list(remote)
        if self.workers is workers:  # else the plan changed meanwhile: this look judged the old one
            self._status = {status.name: status for status in statuses}
        return statuses

    def set_plan(self, workers: list[tuple[StageClient, LayerRange | None]]) -> None:
        """The layers every worker should hold from now on (None: left out of the plan)."""
        self.workers = workers

    def down_for(self, name: str) -> float | None:
        """Seconds device `name` has been unreachable; None while it answers."""
        since = self._down_since.get(name)
        return None if since is None else time.monotonic() - since

    def left_out(self) -> list[DeviceStatus]:
        """The devices the plan in force runs without."""
        return [status for status in self._status.values() if not status.in_plan]

    def left_out_note(self) -> str:
        names = [client.name for client, planned in self.workers if planned is None]
        running = [self.local_name] * bool(self.local) + [c.name for c, p in self.workers if p is not None]
        return f"the layers of {', '.join(names)} run on {', '.join(running)}"

    @property
    def reloading(self) -> bool:
        """A worker that came back is being loaded again."""
        return bool(self._reloads)

    def note(self, name: str, message: str) -> None:
        """Something known of a device from elsewhere (its process exited): shown while it is down."""
        self._notes[name] = message

    def snapshot(self) -> list[DeviceStatus]:
        return list(self._status.values())

    def unhealthy(self) -> list[DeviceStatus]:
        """The devices of the plan in force that are not up with their layers."""
        return [status for status in self._status.values() if status.in_plan and not status.healthy]

    # ---- watching ------------------------------------------------------------------------------

    def start(self, interval: float) -> None:
        self._watch = asyncio.create_task(self._run(interval))

    async def _run(self, interval: float) -> None:
        """Refresh every device's status; reload a worker that restarted and lost its layers."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self.refresh()
                for client, planned in self.workers:
                    status = self._status.get(client.name)
                    waiting = time.monotonic() < self._reload_at.get(client.name, 0.0)
                    if (
                        status
                        and planned is not None
                        and status.status == "not loaded"
                        and client.name not in self._reloads
                        and not waiting
                    ):
                        self._reloads[client.name] = asyncio.create_task(self._reload(client))
                if self.after_refresh is not None:
                    await self.after_refresh()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("device monitor failed")

    async def _reload(self, client: StageClient) -> None:
        try:
            log.warning("%s came back without its layers: loading them again", client.name)
            await self._reload_worker(client)
            self._reload_backoff.setdefault(client.name, Backoff()).succeeded()
            await self.refresh()
        except Exception as error:
            delay = self._reload_backoff.setdefault(client.name, Backoff()).delay()
            self._reload_at[client.name] = time.monotonic() + delay
            log.error("reloading %s failed (trying again in %.0f s): %s", client.name, delay, error)
        finally:
            self._reloads.pop(client.name, None)

    async def stop(self) -> None:
        tasks = [task for task in (self._watch, *self._reloads.values()) if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
