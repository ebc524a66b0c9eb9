"""The chain of stages as the coordinator drives it: its own stages in-process, then remote workers.

`Pipeline.run_step` takes a step of token ids and returns the tokens the last stage sampled. Several
steps may be in flight at once (`depth`: one per stage, or one per compute unit where stages that share
one take turns); each stage processes them in order, one at a time.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping

from meshllm import compute
from meshllm.devices import steps_in_flight
from meshllm.engines.base import Stage
from meshllm.runtime.engine_client import StepListener
from meshllm.runtime.stage_host import LocalStageHost
from meshllm.step import PipelineError, SampledToken, StepInput, StepResult
from meshllm.transport.stage_client import PreparedStep, prepare_step
from meshllm.transport.step_link import Chain, CoordinatorLink, StepChain

log = logging.getLogger(__name__)


class _Sent:
    """When a step left for the remote chain (set on the compute thread, read once its result came)."""

    at = 0.0


class Pipeline:
    def __init__(
        self,
        local: list[LocalStageHost],
        remote: Chain | None,
        local_name: str = "coordinator",
        computes: Mapping[str, str] | None = None,
    ):
        if not local and remote is None:
            raise ValueError("a pipeline needs at least one stage")
        self.local = local
        self.remote = remote
        self.local_name = local_name
        # What each device's stage computes on (`devices.compute_unit`), by device name; a stage not
        # in it counts as a unit of its own.
        self.computes = dict(computes or {})
        # Whether stages that share a unit take turns (one step in flight per unit) rather than
        # computing at once (one per stage): `CoordinatorConfig.shared_stages`, set at start.
        self.take_turns = False
        # Every local forward pass and cache change runs on the process's compute thread, in order; the
        # event loop only moves bytes.
        self.listeners: list[StepListener] = []

    @classmethod
    def in_process(cls, stages: list[Stage], name: str = "local") -> Pipeline:
        """A pipeline of stages loaded in this process, in chain order (the last one samples)."""
        return cls([LocalStageHost.of(name, stage) for stage in stages], remote=None, local_name=name)

    @property
    def depth(self) -> int:
        """How many steps are in flight at once: one per stage, or, where stages that share a compute
        unit take turns (`take_turns`), one per unit (stages on one machine's cores then compute one
        step at a time, the whole batch on every core, where computing at once would split the cores
        and the memory's bandwidth between micro-batches half the size)."""
        names = [host.name for host in self.local]
        names += [stage.name for stage in self.remote.stages] if self.remote else []
        if not self.take_turns:
            return len(names)
        return steps_in_flight([self.computes.get(name, "") for name in names])

    def _notify(self, stage: str, seconds: float) -> None:
        for listener in self.listeners:
            try:
                listener(stage, seconds)
            except Exception:  # metrics must never break serving
                log.exception("step listener failed")

    def _run_local(self, step: StepInput) -> PreparedStep | list[SampledToken]:
        """On the compute thread: the local stages in order, then the sampled tokens or the step for
        the first remote stage (encoded here, off the event loop)."""
        for index, host in enumerate(self.local):
            started = time.perf_counter()
            outcome = host.step(step)
            self._notify(
                f"{self.local_name}/{index}" if len(self.local) > 1 else self.local_name,
                time.perf_counter() - started,
            )
            if outcome.tokens is not None:
                return outcome.tokens
            step = StepInput(
                step.step_id, step.segments, hidden_states=outcome.hidden_states, alone=step.alone
            )
        return prepare_step(step)

    async def run_step(self, step: StepInput) -> list[SampledToken]:
        remote = self.remote
        if not isinstance(remote, StepChain) or (link := await remote.open_link()) is None:
            return await self._run_and_submit(step)
        # Over a step link the compute thread writes the step itself once the local stages are done,
        # and the event loop wakes only for the result.
        future = remote.expect(step.step_id)
        sent = _Sent()
        compute.post(self._run_and_send, step, remote, link, sent)
        return self._tokens(await remote.result(step.step_id, future), sent.at)

    def _run_and_send(self, step: StepInput, chain: StepChain, link: CoordinatorLink, sent: _Sent) -> None:
        """On the compute thread: the local stages, then the step written to the first remote stage
        (or its failure handed to the step's future)."""
        try:
            result = self._run_local(step)
        except Exception as error:
            chain.fail(link, step.step_id, self._local_failure(error))
            return
        if isinstance(result, list):  # cannot happen with a remote chain behind; said, not hidden
            chain.fail(link, step.step_id, PipelineError("a local stage sampled before the remote chain"))
            return
        sent.at = time.perf_counter()
        chain.send(link, result)

    async def _run_and_submit(self, step: StepInput) -> list[SampledToken]:
        try:
            result = await compute.run_async(self._run_local, step)
        except Exception as error:
            raise self._local_failure(error) from error
        if isinstance(result, list):
            return result
        if self.remote is None:
            raise PipelineError(f"device '{self.local_name}': the last local stage did not sample")
        started = time.perf_counter()
        return self._tokens(await self.remote.submit(result), started)

    def _local_failure(self, error: Exception) -> PipelineError:
        log.exception("local stage failed", exc_info=error)
        return PipelineError(f"device '{self.local_name}' (local stage): {error}")

    def _tokens(self, reply: StepResult, sent_at: float) -> list[SampledToken]:
        """A remote chain's reply to a step sent at `sent_at`: its timings told, its tokens."""
        self._notify("remote chain", time.perf_counter() - sent_at)
        for timing in reply.timings:
            self._notify(timing.stage, timing.seconds)
        return reply.tokens

    async def release(self, seq_ids: list[int]) -> None:
        """Drop these sequences' caches on every stage (best effort: a dead worker has none anyway)."""
        if not seq_ids:
            return

        def release_local() -> None:
            for host in self.local:
                host.release(seq_ids)

        await compute.run_async(release_local)
        if self.remote is not None:
            stages = self.remote.stages
            outcomes = await asyncio.gather(*(s.release(seq_ids) for s in stages), return_exceptions=True)
            for stage, outcome in zip(stages, outcomes, strict=True):
                if isinstance(outcome, Exception):
                    log.debug("release on %s failed: %s", stage.name, outcome)

    async def rebuild(self, local: list[LocalStageHost], remote: Chain | None) -> None:
        """Run over other stages from now on (the layers were planned again); the old stream is closed.
        Only while no step is in flight."""
        if not local and remote is None:
            raise ValueError("a pipeline needs at least one stage")
        old, self.local, self.remote = self.remote, local, remote
        if old is not None and old is not remote:
            await old.reset()

    async def close(self) -> None:
        if self.remote is not None:
            await self.remote.reset()
