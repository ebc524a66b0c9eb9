"""Continuous batching: admit many sequences, form steps of prefill chunks and decode tokens, and keep
up to one step per stage in flight so that every machine works at once.

A sequence is in at most one in-flight step, so its positions advance strictly in order on every stage.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace

import numpy as np

from meshllm.runtime.pipeline import Pipeline
from meshllm.step import FinishReason, GeneratedToken, PipelineError, SamplingParams, Segment, StepInput

log = logging.getLogger(__name__)

_FINISHED = object()


@dataclass
class Sequence:
    seq_id: int
    prompt_ids: list[int]
    sampling: SamplingParams
    max_tokens: int
    stop_on_eos: bool
    stop_token_ids: frozenset[int] = frozenset()
    generated: list[int] = field(default_factory=list)
    n_cached: int = 0  # tokens already in every stage's KV cache: the next step starts here
    in_flight: bool = False
    scheduled: bool = False  # has been part of a step: stages may hold its caches
    finished: bool = False
    cancelled: bool = False
    events: asyncio.Queue = field(default_factory=asyncio.Queue)

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.generated

    @property
    def pending(self) -> int:
        """Tokens not yet in the cache: the rest of the prompt, or the last sampled token."""
        return len(self.prompt_ids) + len(self.generated) - self.n_cached

    @property
    def prefilling(self) -> bool:
        return self.n_cached < len(self.prompt_ids)


class SequenceHandle:
    """The async iterator of one sequence's tokens; ends after the token that carries a finish_reason."""

    def __init__(self, sequence: Sequence, scheduler: Scheduler):
        self._sequence = sequence
        self._scheduler = scheduler
        self.seq_id = sequence.seq_id
        self.prompt_tokens = len(sequence.prompt_ids)

    def __aiter__(self) -> AsyncIterator[GeneratedToken]:
        return self

    async def __anext__(self) -> GeneratedToken:
        event = await self._sequence.events.get()
        if event is _FINISHED:
            raise StopAsyncIteration
        if isinstance(event, BaseException):
            raise event
        return event

    def cancel(self) -> None:
        self._scheduler.cancel(self.seq_id)


class Scheduler:
    def __init__(
        self,
        pipeline: Pipeline,
        max_step_tokens: int = 512,
        max_step_sequences: int = 64,
        max_in_flight: int | None = None,
        max_running: int = 128,
    ):
        self.pipeline = pipeline
        self.max_step_tokens = max_step_tokens
        self.max_step_sequences = max_step_sequences
        self.max_in_flight = max_in_flight or pipeline.depth
        # Sequences that hold KV caches on the stages; later arrivals wait, unstarted, for a free place.
        self.max_running = max_running
        self._sequences: dict[int, Sequence] = {}
        self._seq_ids = itertools.count(random.randrange(1, 1 << 40))
        self._in_flight: set[asyncio.Task] = set()
        self._background: set[asyncio.Task] = set()

    @property
    def live_sequences(self) -> int:
        return len(self._sequences)

    def submit(
        self,
        prompt_ids: list[int],
        sampling: SamplingParams,
        max_tokens: int,
        ignore_eos: bool = False,
        stop_token_ids: frozenset[int] = frozenset(),
    ) -> SequenceHandle:
        if not prompt_ids:
            raise ValueError("the prompt has no tokens")
        if max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if sampling.seed is None:  # the last stage's generator is always seeded: same seed, same tokens
            sampling = replace(sampling, seed=random.randrange(1 << 63))
        sequence = Sequence(
            next(self._seq_ids), list(prompt_ids), sampling, max_tokens, not ignore_eos, stop_token_ids
        )
        self._sequences[sequence.seq_id] = sequence
        self._schedule()
        return SequenceHandle(sequence, self)

    def cancel(self, seq_id: int) -> None:
        sequence = self._sequences.get(seq_id)
        if sequence is None or sequence.finished:
            return
        sequence.cancelled = True
        if not sequence.in_flight:
            self._finish(sequence, _FINISHED)

    def _finish(self, sequence: Sequence, event: object) -> None:
        sequence.finished = True
        self._sequences.pop(sequence.seq_id, None)
        sequence.events.put_nowait(event)
        if event is not _FINISHED:
            sequence.events.put_nowait(_FINISHED)
        if sequence.scheduled:
            self._spawn(self.pipeline.release([sequence.seq_id]))

    def _spawn(self, coroutine) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _form_step(self) -> tuple[StepInput, list[Sequence]] | None:
        """Decode tokens first (they keep streams moving), then prefill chunks, within the token budget."""
        ready = [s for s in self._sequences.values() if not s.in_flight and not s.finished and s.pending > 0]
        # Decoding sequences first, each group in arrival order (the sort is stable).
        ready.sort(key=lambda s: s.prefilling)
        # One micro-batch per stage: split the live sequences so that every stage has a step to work on.
        share = -(-min(len(self._sequences), self.max_running) // self.max_in_flight)
        max_sequences = min(self.max_step_sequences, max(share, 1))
        running = sum(1 for s in self._sequences.values() if s.scheduled)
        budget = self.max_step_tokens
        segments: list[Segment] = []
        token_ids: list[int] = []
        members: list[Sequence] = []
        for sequence in ready:
            if budget <= 0 or len(segments) >= max_sequences:
                break
            if not sequence.scheduled:
                if running >= self.max_running:
                    continue  # waits until a running sequence finishes
                running += 1
            n = min(sequence.pending, budget)
            start = sequence.n_cached
            segments.append(
                Segment(
                    seq_id=sequence.seq_id,
                    start_pos=start,
                    n_tokens=n,
                    sample=start + n == len(sequence.tokens),
                    sampling=sequence.sampling,
                )
            )
            token_ids.extend(sequence.tokens[start : start + n])
            members.append(sequence)
            budget -= n
        if not segments:
            return None
        step = StepInput(
            self.pipeline.next_step_id(), segments, token_ids=np.asarray(token_ids, dtype=np.int64)
        )
        return step, members

    def _schedule(self) -> None:
        while len(self._in_flight) < self.max_in_flight:
            formed = self._form_step()
            if formed is None:
                return
            step, members = formed
            for sequence in members:
                sequence.in_flight = sequence.scheduled = True
            self._in_flight.add(asyncio.get_running_loop().create_task(self._run(step, members)))

    async def _run(self, step: StepInput, members: list[Sequence]) -> None:
        try:
            await self._complete(step, members)
        finally:
            self._in_flight.discard(asyncio.current_task())
            self._schedule()

    async def _complete(self, step: StepInput, members: list[Sequence]) -> None:
        try:
            tokens = await self.pipeline.run_step(step)
        except Exception as error:
            failure = error if isinstance(error, PipelineError) else PipelineError(str(error))
            log.warning("step %d failed: %s", step.step_id, failure)
            for sequence in members:
                sequence.in_flight = False
                if not sequence.finished:
                    self._finish(sequence, failure)
            return
        sampled = {token.seq_id: token for token in tokens}
        for segment, sequence in zip(step.segments, members, strict=True):
            sequence.in_flight = False
            sequence.n_cached += segment.n_tokens
            if sequence.cancelled:
                self._finish(sequence, _FINISHED)
                continue
            token = sampled.get(sequence.seq_id)
            if token is None:
                continue  # a prefill chunk that is not the prompt's last
            sequence.generated.append(token.token_id)
            finish_reason: FinishReason | None = None
            if sequence.stop_on_eos and token.token_id in sequence.sampling.eos_token_ids:
                finish_reason = "stop"
            elif (
                token.token_id in sequence.stop_token_ids
                and len(sequence.generated) > sequence.sampling.min_tokens
            ):
                finish_reason = "stop"
            elif len(sequence.generated) >= sequence.max_tokens:
                finish_reason = "length"
            event = GeneratedToken(token.token_id, token.logprob, finish_reason)
            if finish_reason:
                self._finish(sequence, event)
            else:
                sequence.events.put_nowait(event)

    async def close(self) -> None:
        """End every live sequence with an error, then wait (briefly) for the stages to free their caches."""
        for sequence in list(self._sequences.values()):
            self._finish(sequence, PipelineError("the coordinator is shutting down"))
        for task in list(self._in_flight):
            task.cancel()
        if self._background:
            await asyncio.wait(list(self._background), timeout=5.0)
