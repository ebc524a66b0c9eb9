"""The layers planned again around a device that stays down, and back when it returns.

A worker still unreachable `replan_after` seconds after it went is left out: its layers are planned over
the devices that answer (within their memory), every stage whose range or next stage changes is loaded
again, and the sequences waiting on the lost stage are prefilled again on the new chain. The cluster is
then degraded: it serves, and `/health` names the device that is out. Once every device left out answers
again and no sequence is live, the plan the coordinator started with is restored the same way.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from meshllm import compute
from meshllm.errors import ConfigError
from meshllm.models.checkpoint import Checkpoint
from meshllm.models.plan import StagePlan, make_plan
from meshllm.runtime.backoff import Backoff
from meshllm.runtime.coordinator_config import CoordinatorConfig
from meshllm.runtime.engine_loop import EngineLoop
from meshllm.runtime.monitor import DeviceMonitor
from meshllm.runtime.stage_host import LocalStageHost
from meshllm.step import LayerRange
from meshllm.transport.stage import LoadSpec
from meshllm.transport.stage_client import StageClient
from meshllm.transport.step_link import StepChain

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Placement:
    """What one stage should hold: its layers and the address its output goes to ("" when last)."""

    layers: LayerRange
    next_stage: str


class Replanner:
    """Owns the plan in force: which device runs which layers, and which devices are left out."""

    def __init__(
        self,
        config: CoordinatorConfig,
        checkpoint: Checkpoint,
        full_plan: list[StagePlan],
        clients: list[StageClient],
        local: list[LocalStageHost],
        loop: EngineLoop,
        monitor: DeviceMonitor,
        speeds: Mapping[str, float] | None,
        load_worker: Callable[[StageClient, LayerRange, str], Awaitable[None]],  # layers, next stage
    ) -> None:
        self.config = config
        self.checkpoint = checkpoint
        self.full_plan = list(full_plan)
        self.plan = list(full_plan)  # in force now
        self.clients = {client.name: client for client in clients}
        self.local = local
        self.loop = loop
        self.monitor = monitor
        self.speeds = dict(speeds or {})
        self._load_worker = load_worker
        self._loaded: dict[str, Placement] = {}  # what each worker was last loaded with
        self._backoff = Backoff(base=2.0, cap=30.0)
        self._retry_at = 0.0  # a failed change is tried again from then on
        self._cannot: tuple[frozenset[str], str] | None = None  # survivors the layers do not fit on, and why
        # False from the first load of a change until the chain runs over what was loaded: the stages may
        # then hold layers that do not follow each other, and nothing may run through them.
        self.settled = True
        self.problem = ""  # why it is not settled
        self._loaded.update(self._placements(self.plan))

    # ---- the plan in force -------------------------------------------------------------------------

    @property
    def left_out(self) -> list[str]:
        """Devices of the full plan that the plan in force runs without, in chain order."""
        running = {stage.device for stage in self.plan}
        return [stage.device for stage in self.full_plan if stage.device not in running]

    def _placements(self, plan: list[StagePlan]) -> dict[str, Placement]:
        addresses = [self.clients[s.device].address if s.device in self.clients else "" for s in plan]
        return {
            stage.device: Placement(stage.layer_range, next_address)
            for stage, next_address in zip(plan, [*addresses[1:], ""], strict=True)
            if stage.device in self.clients
        }

    def placement(self, name: str) -> Placement | None:
        """What worker `name` should hold now; None while it is left out."""
        return self._placements(self.plan).get(name)

    async def reload(self, client: StageClient) -> None:
        """Load a worker that came back without its layers with what the plan in force gives it."""
        placement = self.placement(client.name)
        if placement is None:
            return  # left out: it rejoins when the full plan is restored
        await self._load_worker(client, placement.layers, placement.next_stage)
        self._loaded[client.name] = placement
        if self.loop.pipeline.remote is not None:
            await self.loop.pipeline.remote.reset()  # every stage after it needs a new stream

    # ---- deciding ----------------------------------------------------------------------------------

    async def check(self) -> None:
        """After each look at the devices: leave out one gone too long, or restore the full plan."""
        after = self.config.replan_after
        if after is None or self.monitor.reloading or time.monotonic() < self._retry_at:
            return
        running = [stage.device for stage in self.plan]
        gone = [
            name for name in running if name in self.clients and (self.monitor.down_for(name) or 0.0) >= after
        ]
        if gone:
            survivors = [name for name in running if name not in gone]
            await self._change(survivors, f"{', '.join(gone)} down for {after:g} s or more")
            return
        self._cannot, self.monitor.cannot_replan = None, ""  # nothing is gone (any more)
        left_out = self.left_out
        if (
            left_out
            and self.loop.idle
            and not self.monitor.unhealthy()
            and all(self.monitor.down_for(name) is None for name in left_out)
        ):
            await self._change([stage.device for stage in self.full_plan], f"{', '.join(left_out)} back")

    def _plan_over(self, names: list[str]) -> list[StagePlan]:
        """The full plan for every device; else the layers balanced over `names`, within their memory."""
        if names == [stage.device for stage in self.full_plan]:
            return self.full_plan
        statuses = {status.name: status for status in self.monitor.snapshot()}
        memory = []
        for name in names:
            status = statuses[name]
            # What it has free once it drops the layers it holds now.
            offered = status.memory_available + status.weight_bytes
            memory.append((name, self.config.memory_overrides.get(name, offered)))
        return make_plan(
            self.checkpoint,
            memory,
            self.config.dtype,
            quantize={name: self.config.quantize_of(name) for name in names},
            group_size=self.config.group_size,
            speeds={name: self.speeds[name] for name in names if name in self.speeds} or None,
        )

    async def _change(self, names: list[str], why: str) -> None:
        if not names:
            return
        try:
            plan = self._plan_over(names)
        except ConfigError as error:
            key = frozenset(names)
            if self._cannot is None or self._cannot[0] != key:  # said once per set of survivors
                log.error("cannot plan the layers over %s (%s): %s", ", ".join(names), why, error)
            self._cannot = (key, str(error))
            self.monitor.cannot_replan = f"the layers cannot be planned over {', '.join(names)}: {error}"
            return
        self._cannot, self.monitor.cannot_replan = None, ""
        described = ", ".join(f"{s.device} {list(s.layer_range)}" for s in plan)
        log.warning("planning the layers again (%s): %s", why, described)
        try:
            await self._apply(plan)
        except Exception as error:
            delay = self._backoff.delay()
            self._retry_at = time.monotonic() + delay
            log.error("planning the layers again failed (trying again in %.0f s): %s", delay, error)
            self.problem = f"planning the layers again failed (trying again in {delay:.0f} s): {error}"
            if not self.left_out or gone_from(plan, self.plan):
                return  # the plan in force lost a device: going back to it cannot help
            try:  # a restore that failed: back to the (degraded) plan that worked
                await self._apply(self.plan)
            except Exception as again:
                log.error("going back to the plan in force failed too: %s", again)
                self.problem = f"{self.problem}; going back to the plan in force failed too: {again}"
            else:
                log.warning("back to the plan in force: %s", ", ".join(s.device for s in self.plan))
            return
        self._backoff.succeeded()
        left_out = self.left_out
        log.warning(
            "layers planned again: %s%s",
            described,
            f"; left out: {', '.join(left_out)}" if left_out else " (the full plan)",
        )

    # ---- changing ----------------------------------------------------------------------------------

    async def _apply(self, plan: list[StagePlan]) -> None:
        """Load every stage whose layers or next stage change, then run the sequences on the new chain."""
        config = self.config
        placements = self._placements(plan)
        reason = "the layers are being planned again"
        async with self.loop.held(reason, timeout=config.step_timeout + 5.0):
            self.settled = False
            loads: list[Awaitable[object]] = [
                self._load_worker(self.clients[name], placement.layers, placement.next_stage)
                for name, placement in placements.items()
                if self._loaded.get(name) != placement
            ]
            for host in self.local[: int(config.local_stage)]:  # the coordinator's own stage is first
                stage = host.stage
                wanted = plan[0].layer_range
                if stage is None or stage.layer_range != wanted:
                    spec = LoadSpec(
                        config.model,
                        wanted,
                        config.dtype,
                        quantize=config.quantize_of(config.name),
                        group_size=config.group_size,
                    )
                    loads.append(compute.run_async(host.load, spec))
            for name in self.clients:  # unknown until its load succeeds; one left out loads on its return
                if self._loaded.get(name) != placements.get(name):
                    self._loaded.pop(name, None)
            await asyncio.gather(*loads)
            self._loaded.update(placements)
            chain = [self.clients[stage.device] for stage in plan if stage.device in self.clients]
            remote = StepChain(chain, config.step_timeout) if chain else None
            await self.loop.pipeline.rebuild(self.local, remote)
            self.loop.scheduler.max_in_flight = self.loop.pipeline.depth
            self.plan, self.problem = list(plan), ""
            self.monitor.set_plan(
                [(client, placements[name].layers if name in placements else None)
                 for name, client in self.clients.items()]
            )  # fmt: skip
            try:  # settled once the devices' status judges this plan, not the one before
                await self.monitor.refresh()
            finally:
                self.settled = True


def gone_from(new: list[StagePlan], old: list[StagePlan]) -> bool:
    """Whether `new` runs without a device that `old` has (a shrink, not a restore)."""
    return bool({stage.device for stage in old} - {stage.device for stage in new})
