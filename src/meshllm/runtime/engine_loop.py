"""The async loop around the scheduler: it sends the steps the scheduler forms through the pipeline,
feeds their outcomes back, and delivers each sequence's events to its token stream."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

from meshllm.engines.base import Stage
from meshllm.runtime.engine_client import GenerateRequest
from meshllm.runtime.pipeline import Pipeline
from meshllm.runtime.scheduler import ScheduledStep, Scheduler, SequenceEvent, Update
from meshllm.step import GeneratedToken, PipelineError, StageLost

log = logging.getLogger(__name__)


class SequenceStream:
    """The async iterator of one sequence's tokens; ends after the token that carries a finish reason,
    raises the PipelineError that ended it, or just ends after an abort."""

    def __init__(self, seq_id: int, prompt_tokens: int, loop: EngineLoop) -> None:
        self.seq_id = seq_id
        self.prompt_tokens = prompt_tokens
        self._loop = loop
        self._events: asyncio.Queue[SequenceEvent] = asyncio.Queue()
        self._ended = False

    def deliver(self, event: SequenceEvent) -> None:
        self._events.put_nowait(event)

    def __aiter__(self) -> SequenceStream:
        return self

    async def __anext__(self) -> GeneratedToken:
        if self._ended:
            raise StopAsyncIteration
        event = await self._events.get()
        self._ended = event.done
        if event.error is not None:
            raise event.error
        if event.token is None:
            raise StopAsyncIteration
        return event.token

    def cancel(self) -> None:
        self._loop.abort(self.seq_id)


class EngineLoop:
    """Owns the steps in flight (at most one per stage) and every live sequence's stream."""

    def __init__(
        self,
        scheduler: Scheduler,
        pipeline: Pipeline,
        whole: Callable[[], bool] | None = None,
        replay_timeout: float = 60.0,
    ) -> None:
        self.scheduler = scheduler
        self.pipeline = pipeline
        # With `whole` (is every stage up with its layers?), a lost stage stalls its sequences, and they
        # are prefilled again once it says yes; they end with an error after `replay_timeout` seconds.
        self.whole = whole
        self.replay_timeout = replay_timeout
        self._streams: dict[int, SequenceStream] = {}
        self._tasks: set[asyncio.Task[None]] = set()  # steps in flight and releases under way
        self._recovering: asyncio.Task[None] | None = None
        self._held = False  # the pipeline is being changed (`held()`): nothing is sent, nothing resumes

    @classmethod
    def in_process(cls, stages: list[Stage], max_running: int = 128) -> EngineLoop:
        """An engine over stages loaded in this process (`meshllm generate`, tests, benchmarks)."""
        pipeline = Pipeline.in_process(stages)
        return cls(Scheduler(pipeline.depth, max_running=max_running), pipeline)

    @property
    def live_sequences(self) -> int:
        return self.scheduler.live_sequences

    def submit(self, request: GenerateRequest) -> SequenceStream:
        seq_id = self.scheduler.add(request)
        stream = SequenceStream(seq_id, len(request.prompt_ids), self)
        self._streams[seq_id] = stream
        self._send_steps()
        return stream

    def abort(self, seq_id: int) -> None:
        self._apply(self.scheduler.abort(seq_id))

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _send_steps(self) -> None:
        while (step := self.scheduler.schedule()) is not None:
            self._spawn(self._run(step))

    async def _run(self, step: ScheduledStep) -> None:
        sent = time.monotonic()  # a sequence's wait for a lost stage counts from here: its last progress
        try:
            tokens = await self.pipeline.run_step(step.input)
        except Exception as error:
            failure = error if isinstance(error, PipelineError) else PipelineError(str(error))
            replay = self.whole is not None and isinstance(failure, StageLost)
            log.warning(
                "step %d failed%s: %s", step.step_id, " (its sequences wait to replay)" * replay, failure
            )
            update = self.scheduler.fail(step.step_id, failure, replay=replay, now=sent)
        else:
            update = self.scheduler.update(step.step_id, tokens)
        self._apply(update)
        if self.scheduler.paused and self._recovering is None:
            self._recovering = asyncio.get_running_loop().create_task(self._recover())
        self._send_steps()

    async def _recover(self, interval: float = 0.5) -> None:
        """Wait for the pipeline to be whole again (ending what waits too long), then replay."""
        assert self.whole is not None  # paused only when replaying
        try:
            while self.scheduler.paused:
                await asyncio.sleep(interval)
                self._apply(self.scheduler.expire(time.monotonic(), self.replay_timeout))
                if self.scheduler.in_flight == 0 and not self._held and self.whole():
                    log.warning("the pipeline is whole again: %d sequences replay", self.scheduler.stalled)
                    self.scheduler.resume()
        finally:
            self._recovering = None
        self._send_steps()

    @contextlib.asynccontextmanager
    async def held(self, reason: str, timeout: float) -> AsyncIterator[None]:
        """Within: nothing is scheduled and no step is in flight, so the pipeline may change. Leaving it
        normally, every sequence that had started is prefilled again from its first token (its caches are
        gone or stale) and goes on; leaving with an error, they wait as after a lost stage. Raises
        TimeoutError if the steps out do not come back within `timeout` seconds."""
        error = PipelineError(reason)
        self._held = True
        self.scheduler.hold(error, time.monotonic())
        changed = False
        try:
            deadline = time.monotonic() + timeout
            while self.scheduler.in_flight:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{self.scheduler.in_flight} steps did not come back in {timeout:.0f} s"
                    )
                await asyncio.sleep(0.05)
            self.scheduler.hold(error, time.monotonic())  # the steps that came back meanwhile
            yield
            changed = True
        finally:
            self._held = False
            if changed:
                self.scheduler.resume()
                self._send_steps()
            elif self._recovering is None:
                self._recovering = asyncio.get_running_loop().create_task(self._recover())

    @property
    def idle(self) -> bool:
        """No sequence is live."""
        return self.scheduler.live_sequences == 0

    def _apply(self, update: Update) -> None:
        for event in update.events:
            stream = self._streams.get(event.seq_id)
            if stream is None:
                continue
            stream.deliver(event)
            if event.done:
                del self._streams[event.seq_id]
        if update.release:
            self._spawn(self.pipeline.release(update.release))

    async def close(self) -> None:
        """End every live sequence with an error, then wait (briefly) for the stages to free their caches."""
        in_flight = list(self._tasks)
        if self._recovering is not None:
            self._recovering.cancel()
        self._apply(self.scheduler.close(PipelineError("the coordinator is shutting down")))
        for task in in_flight:
            task.cancel()
        releases = [task for task in self._tasks if task not in in_flight]
        if releases:
            await asyncio.wait(releases, timeout=5.0)
        await self.pipeline.close()
