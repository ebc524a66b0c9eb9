"""Continuous batching as plain, synchronous policy: which segments form the next step, and what a
step's sampled tokens mean for each sequence. No asyncio, no sockets: the engine loop
(`engine_loop.py`) runs the steps this decides and delivers the events it returns.

- `add(request)` admits a sequence; `abort(seq_id)` ends one early.
- `schedule()` forms the next step, or None: at most `max_in_flight` steps (one per stage) are out at
  once, and a sequence is in at most one of them, so its positions advance strictly in order on every
  stage. Decode tokens come first (they keep streams moving), then prompt chunks, within a token budget;
  the live sequences are split into one micro-batch per stage so that every stage has work.
- `update(step_id, tokens)` / `fail(step_id, error)` take a step's outcome and return what happened to
  each sequence (`SequenceEvent`s) and which sequences the stages may now forget (`release`).
- KV admission by bytes: with `kv_budgets` (each stage's KV bytes per token and the memory its caches
  may take), a sequence starts only while the caches it may grow to (prompt + max_tokens) fit next to
  those of every started sequence on every stage; later arrivals wait, in arrival order. `add` refuses a
  sequence that could not fit even alone, naming the stage and its limit.
- Every stop condition about tokens is decided here: eos (unless ignore_eos), stop token ids (once
  min_tokens were made), max_tokens.
- Replay: `fail(step_id, error, replay=True)` (a stage was lost) does not end the step's sequences. They
  are `STALLED` and nothing is scheduled (`paused`) until `resume()`, when the pipeline is whole again:
  then each is prefilled again from position 0 (its prompt and the tokens it had), its sampler resumed
  where it was, and it goes on with the tokens it would have had. `expire(now, timeout)` ends those that
  waited too long (counted from the step that was lost: their last progress).
- Re-plan: `hold(reason, now)` pauses scheduling while the pipeline changes under the sequences (the
  layers move to other devices); the started ones stall like those of a lost step, and `resume()` prefills
  every one again.
"""

from __future__ import annotations

import enum
import itertools
import random
from dataclasses import dataclass, field, replace

import numpy as np

from meshllm.runtime.engine_client import GenerateRequest
from meshllm.step import FinishReason, GeneratedToken, PipelineError, SampledToken, Segment, StepInput


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # admitted; no stage holds anything of it yet
    RUNNING = "running"  # the stages hold its caches; not in a step right now
    IN_FLIGHT = "in flight"  # part of a step that has not come back
    ABORTING = "aborting"  # aborted while in flight: ends when its step comes back
    STALLED = "stalled"  # its step was lost with a stage: waits to be prefilled again


@dataclass
class Sequence:
    seq_id: int
    request: GenerateRequest
    generated: list[int] = field(default_factory=list)
    n_cached: int = 0  # tokens already in every stage's KV cache: the next step starts here
    status: SequenceStatus = SequenceStatus.WAITING
    stalled_since: float = 0.0  # when its step was lost (monotonic seconds)
    stall_error: PipelineError | None = None  # what it ends with if the pipeline stays broken

    @property
    def length(self) -> int:
        return len(self.request.prompt_ids) + len(self.generated)

    @property
    def pending(self) -> int:
        """Tokens not yet in the cache: the rest of the prompt, or the last sampled token."""
        return self.length - self.n_cached

    @property
    def prefilling(self) -> bool:
        return self.n_cached < len(self.request.prompt_ids)

    def token_ids(self, start: int, count: int) -> list[int]:
        """Tokens `[start, start + count)` of prompt + generated, without joining the two lists."""
        prompt = self.request.prompt_ids
        end = start + count
        if end <= len(prompt):
            return prompt[start:end]
        if start >= len(prompt):
            return self.generated[start - len(prompt) : end - len(prompt)]
        return prompt[start:] + self.generated[: end - len(prompt)]

    def finish_reason(self, token_id: int) -> FinishReason | None:
        """Whether the token just sampled ends the sequence, and why."""
        request = self.request
        if not request.ignore_eos and token_id in request.sampling.eos_token_ids:
            return "stop"
        if token_id in request.stop_token_ids and len(self.generated) > request.sampling.min_tokens:
            return "stop"
        if len(self.generated) >= request.max_tokens:
            return "length"
        return None


@dataclass(frozen=True)
class KVBudget:
    """What one stage's KV caches may hold: `memory` bytes at `bytes_per_token` per token of a sequence."""

    device: str
    bytes_per_token: int
    memory: int

    @property
    def tokens(self) -> int:
        return self.memory // self.bytes_per_token


@dataclass(frozen=True)
class SequenceEvent:
    """What happened to one sequence: a token, an error, or its end (`done`) after an abort."""

    seq_id: int
    token: GeneratedToken | None = None
    error: PipelineError | None = None

    @property
    def done(self) -> bool:
        return self.token is None or self.token.finish_reason is not None


@dataclass(frozen=True)
class ScheduledStep:
    step_id: int
    input: StepInput  # token ids and segments, for the first stage
    seq_ids: list[int]


@dataclass
class Update:
    events: list[SequenceEvent] = field(default_factory=list)
    release: list[int] = field(default_factory=list)  # sequences every stage may drop now


class Scheduler:
    def __init__(
        self,
        max_in_flight: int,
        max_step_tokens: int = 512,
        max_step_sequences: int = 64,
        max_running: int = 128,
        kv_budgets: list[KVBudget] | tuple[KVBudget, ...] = (),
    ):
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self.max_in_flight = max_in_flight  # one step per stage keeps every stage busy
        self.max_step_tokens = max_step_tokens
        self.max_step_sequences = max_step_sequences
        # Sequences that hold KV caches on the stages; later arrivals wait, unstarted, for a free place.
        self.max_running = max_running
        # Stages that said what their caches may hold (one that did not, an older peer, limits nothing).
        self.kv_budgets = [b for b in kv_budgets if b.bytes_per_token > 0 and b.memory > 0]
        self._sequences: dict[int, Sequence] = {}  # live ones, in arrival order
        self._in_flight: dict[int, ScheduledStep] = {}
        self._seq_ids = itertools.count(random.randrange(1, 1 << 40))  # unlike an earlier run's ids
        self._step_ids = itertools.count(1)
        self.paused = False  # a stage was lost: nothing is scheduled until `resume()`

    @property
    def live_sequences(self) -> int:
        return len(self._sequences)

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    @property
    def waiting(self) -> int:
        """Admitted sequences that wait for a place (no stage holds anything of them yet)."""
        return sum(1 for s in self._sequences.values() if s.status == SequenceStatus.WAITING)

    @property
    def kv_tokens(self) -> int | None:
        """Tokens the stages' KV caches may hold in all (the smallest stage decides); None: no limit."""
        return min((budget.tokens for budget in self.kv_budgets), default=None)

    @property
    def kv_reserved(self) -> int:
        """Tokens the started sequences' caches may grow to, together."""
        return sum(_projected(s) for s in self._sequences.values() if s.status != SequenceStatus.WAITING)

    def _check_fits_alone(self, request: GenerateRequest) -> None:
        needed = len(request.prompt_ids) + request.max_tokens
        for budget in self.kv_budgets:
            if needed > budget.tokens:
                raise ValueError(
                    f"prompt ({len(request.prompt_ids)} tokens) plus max_tokens ({request.max_tokens}) "
                    f"needs {needed * budget.bytes_per_token / 1e6:.1f} MB of KV cache on device "
                    f"'{budget.device}', whose KV memory limit is {budget.memory / 1e6:.1f} MB "
                    f"({budget.tokens} tokens); shorten the prompt or max_tokens"
                )

    def status(self, seq_id: int) -> SequenceStatus | None:
        """None for a sequence that ended (or never was)."""
        sequence = self._sequences.get(seq_id)
        return sequence.status if sequence else None

    def add(self, request: GenerateRequest) -> int:
        if not request.prompt_ids:
            raise ValueError("the prompt has no tokens")
        if request.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        self._check_fits_alone(request)
        if (
            request.sampling.seed is None
        ):  # the last stage's generator is always seeded: same seed, same tokens
            request = replace(request, sampling=replace(request.sampling, seed=random.randrange(1 << 63)))
        sequence = Sequence(next(self._seq_ids), replace(request, prompt_ids=list(request.prompt_ids)))
        self._sequences[sequence.seq_id] = sequence
        return sequence.seq_id

    def abort(self, seq_id: int) -> Update:
        update = Update()
        sequence = self._sequences.get(seq_id)
        if sequence is None or sequence.status == SequenceStatus.ABORTING:
            return update
        if sequence.status == SequenceStatus.IN_FLIGHT:
            sequence.status = SequenceStatus.ABORTING  # the stages are still working on it
        elif sequence.status == SequenceStatus.STALLED:
            self._finish(sequence, SequenceEvent(seq_id), update)
        else:
            self._finish(sequence, SequenceEvent(seq_id), update)
        return update

    def _finish(self, sequence: Sequence, event: SequenceEvent, update: Update) -> None:
        del self._sequences[sequence.seq_id]
        update.events.append(event)
        if sequence.status != SequenceStatus.WAITING:
            update.release.append(sequence.seq_id)

    def schedule(self) -> ScheduledStep | None:
        """The next step to send, or None (enough steps are out, or no sequence has work)."""
        if self.paused or len(self._in_flight) >= self.max_in_flight:
            return None
        ready = [
            s
            for s in self._sequences.values()
            if s.status in (SequenceStatus.WAITING, SequenceStatus.RUNNING) and s.pending > 0
        ]
        ready.sort(key=lambda s: s.prefilling)  # decoding first, each group in arrival order (stable)
        # One micro-batch per stage: split the live sequences so that every stage has a step to work on.
        share = -(-min(len(self._sequences), self.max_running) // self.max_in_flight)
        max_sequences = min(self.max_step_sequences, max(share, 1))
        running = sum(1 for s in self._sequences.values() if s.status != SequenceStatus.WAITING)
        kv_tokens, kv_reserved = self.kv_tokens, self.kv_reserved
        admitting = True  # arrival order: once one waiting sequence does not fit, later ones wait too
        budget = self.max_step_tokens
        segments: list[Segment] = []
        token_ids: list[int] = []
        members: list[Sequence] = []
        for sequence in ready:
            if budget <= 0 or len(segments) >= max_sequences:
                break
            if sequence.status == SequenceStatus.WAITING:
                fits = kv_tokens is None or kv_reserved + _projected(sequence) <= kv_tokens
                if not (admitting and fits and running < self.max_running):
                    admitting = False
                    continue  # waits until a running sequence finishes
                running += 1
                kv_reserved += _projected(sequence)
            count = min(sequence.pending, budget)
            start = sequence.n_cached
            segments.append(
                Segment(
                    seq_id=sequence.seq_id,
                    start_pos=start,
                    n_tokens=count,
                    sample=start + count == sequence.length,
                    sampling=sequence.request.sampling,
                    sampled=len(sequence.generated),
                )
            )
            token_ids.extend(sequence.token_ids(start, count))
            members.append(sequence)
            budget -= count
        if not segments:
            return None
        step_id = next(self._step_ids)
        for sequence in members:
            sequence.status = SequenceStatus.IN_FLIGHT
        step = ScheduledStep(
            step_id,
            StepInput(
                step_id,
                segments,
                token_ids=np.asarray(token_ids, dtype=np.int64),
                alone=not self._in_flight,  # the only step out: the stages may use every core
            ),
            [s.seq_id for s in members],
        )
        self._in_flight[step_id] = step
        return step

    def update(self, step_id: int, tokens: list[SampledToken]) -> Update:
        """A step came back with the tokens the last stage sampled."""
        step = self._in_flight.pop(step_id)
        sampled = {token.seq_id: token for token in tokens}
        update = Update()
        for segment in step.input.segments:
            sequence = self._sequences.get(segment.seq_id)
            if sequence is None:
                continue  # ended while in flight (close)
            sequence.n_cached += segment.n_tokens
            if sequence.status == SequenceStatus.ABORTING:
                self._finish(sequence, SequenceEvent(sequence.seq_id), update)
                continue
            sequence.status = SequenceStatus.RUNNING
            token = sampled.get(sequence.seq_id)
            if token is None:
                continue  # a prefill chunk that is not the prompt's last
            sequence.generated.append(token.token_id)
            sequence.stalled_since, sequence.stall_error = 0.0, None  # it goes on: any stall is over
            finish_reason = sequence.finish_reason(token.token_id)
            event = SequenceEvent(
                sequence.seq_id, GeneratedToken(token.token_id, token.logprob, finish_reason)
            )
            if finish_reason:
                self._finish(sequence, event, update)
            else:
                update.events.append(event)
        return update

    def fail(self, step_id: int, error: PipelineError, replay: bool = False, now: float = 0.0) -> Update:
        """A step failed: every sequence in it ends with `error`, or, with `replay`, stalls until `resume()`
        (an aborted one ends). `now`: when the step was sent, where a stalled sequence's wait begins."""
        step = self._in_flight.pop(step_id)
        update = Update()
        for seq_id in step.seq_ids:
            sequence = self._sequences.get(seq_id)
            if sequence is None:
                continue
            if replay and sequence.status != SequenceStatus.ABORTING:
                sequence.status, sequence.n_cached = SequenceStatus.STALLED, 0
                sequence.stalled_since = sequence.stalled_since or now  # a failed replay keeps its clock
                sequence.stall_error = sequence.stall_error or error
            else:
                self._finish(sequence, SequenceEvent(seq_id, error=error), update)
        if replay:
            self.paused = True
        return update

    @property
    def stalled(self) -> int:
        return sum(1 for s in self._sequences.values() if s.status == SequenceStatus.STALLED)

    def resume(self) -> None:
        """The pipeline is whole again: every sequence that had started is prefilled again from its first
        token (a stage that was started again, or that holds other layers now, has none of its cache)."""
        self.paused = False
        for sequence in self._sequences.values():
            if sequence.status in (SequenceStatus.STALLED, SequenceStatus.RUNNING):
                sequence.status = SequenceStatus.RUNNING  # the stages may still hold (stale) caches of it
                sequence.n_cached = 0

    def hold(self, error: PipelineError, now: float) -> None:
        """Schedule nothing until `resume()`: the pipeline is about to change under the sequences. Those
        not in a step stall (their caches will be gone), keeping an earlier stall's clock and error."""
        self.paused = True
        for sequence in self._sequences.values():
            if sequence.status == SequenceStatus.RUNNING:
                sequence.status, sequence.n_cached = SequenceStatus.STALLED, 0
                sequence.stalled_since = sequence.stalled_since or now
                sequence.stall_error = sequence.stall_error or error

    def expire(self, now: float, timeout: float) -> Update:
        """End the stalled sequences that have waited `timeout` seconds, with the error that stalled them."""
        update = Update()
        for sequence in list(self._sequences.values()):
            if sequence.status == SequenceStatus.STALLED and now - sequence.stalled_since >= timeout:
                error = PipelineError(
                    f"{sequence.stall_error}; the pipeline was not whole again within {timeout:.0f} s"
                )
                self._finish(sequence, SequenceEvent(sequence.seq_id, error=error), update)
        return update

    def close(self, error: PipelineError) -> Update:
        """End every live sequence with `error`; steps still out are forgotten."""
        update = Update()
        for sequence in list(self._sequences.values()):
            self._finish(sequence, SequenceEvent(sequence.seq_id, error=error), update)
        self._in_flight.clear()
        return update


def _projected(sequence: Sequence) -> int:
    """Tokens a sequence's caches hold at most: its prompt and every token it may generate."""
    return len(sequence.request.prompt_ids) + sequence.request.max_tokens
