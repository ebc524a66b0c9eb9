"""One sequence on the pipeline, seen as text: submit, wait for the first token, then text deltas.

Shared by chat and completions, streamed or not: each reply is the concatenation of the same deltas.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from meshllm.runtime.engine_client import GenerateRequest as EngineRequest
from meshllm.server.errors import invalid, unavailable
from meshllm.server.metrics import ServerMetrics
from meshllm.server.text import IncrementalDetokenizer, StopStrings
from meshllm.step import FinishReason, GeneratedToken, PipelineError, PipelineUnavailable, SamplingParams

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationRequest:
    """A validated request, ready for the pipeline."""

    prompt_ids: list[int]
    sampling: SamplingParams
    max_tokens: int
    ignore_eos: bool = False
    min_tokens: int = 0  # neither eos, stop_token_ids nor stop strings end the reply before this many tokens
    stop: tuple[str, ...] = ()
    stop_token_ids: frozenset[int] = field(default_factory=frozenset)
    skip_special_tokens: bool = True


@dataclass(frozen=True)
class TextDelta:
    text: str
    completion_tokens: int  # generated so far, this one included
    finish_reason: FinishReason | None = None  # on the last delta


class Generation:
    """Drives one sequence: `await start()`, then `async for delta in deltas()`; `close()` always."""

    def __init__(
        self,
        coordinator: Any,
        request: GenerationRequest,
        metrics: ServerMetrics | None = None,
        arrival: float | None = None,
    ) -> None:
        self._coordinator = coordinator
        self._request = request
        self._metrics = metrics
        self._arrival = time.monotonic() if arrival is None else arrival
        self._eos_token_ids = frozenset(coordinator.model.eos_token_ids)
        self._detokenizer = IncrementalDetokenizer(
            coordinator.tokenizer, request.prompt_ids, request.skip_special_tokens
        )
        self._stop_strings = StopStrings(request.stop)
        self._handle: Any = None
        self._tokens: AsyncIterator[GeneratedToken] | None = None
        self._first: GeneratedToken | None = None
        self._last_token_at = 0.0
        self._first_received_at = 0.0
        self._ended = False  # the pipeline is done with the sequence: nothing to cancel
        self.completion_tokens = 0

    @property
    def prompt_tokens(self) -> int:
        return len(self._request.prompt_ids)

    @property
    def seq_id(self) -> int | None:
        return None if self._handle is None else self._handle.seq_id

    async def start(self) -> None:
        """Submits the sequence and waits for its first token. A pipeline that cannot serve it is a 503."""
        request = self._request
        try:
            self._handle = self._coordinator.generate(
                EngineRequest(
                    request.prompt_ids,
                    request.sampling,
                    request.max_tokens,
                    ignore_eos=request.ignore_eos,
                    stop_token_ids=request.stop_token_ids,
                )
            )
        except PipelineUnavailable as error:
            raise unavailable(str(error)) from None
        except ValueError as error:
            raise invalid(str(error)) from None
        if self._metrics:
            self._metrics.observe_prompt(self.prompt_tokens)
        self._tokens = aiter(self._handle)
        try:
            self._first = await anext(self._tokens)
            self._first_received_at = time.monotonic()
        except StopAsyncIteration:
            self._ended = True
            raise unavailable("the pipeline ended the sequence before its first token") from None
        except PipelineError as error:
            self._ended = True
            self._finished("error")
            raise unavailable(str(error)) from None
        except BaseException:
            self.close()
            raise

    async def deltas(self) -> AsyncIterator[TextDelta]:
        """The reply as text pieces; the last one has the finish reason. Raises PipelineError on failure."""
        assert self._tokens is not None, "start() first"
        token, self._first = self._first, None
        try:
            while token is not None:
                delta = self._on_token(token)
                if delta.finish_reason:
                    self._finished(delta.finish_reason)
                    yield delta
                    return
                if delta.text:
                    yield delta
                try:
                    token = await anext(self._tokens)
                except StopAsyncIteration:
                    token = None
            self._ended = True
            raise PipelineError("the sequence was cancelled before it finished")
        except PipelineError:
            self._ended = True
            self._finished("error")
            raise
        finally:
            self.close()

    def close(self) -> None:
        """Cancels the sequence unless the pipeline already finished it, so every stage frees its cache."""
        if self._handle is not None and not self._ended:
            self._ended = True
            try:
                self._coordinator.abort(self._handle.seq_id)
            except Exception:  # closing must never fail a request that is already over
                log.exception("cancelling sequence %s failed", self._handle.seq_id)

    def _on_token(self, token: GeneratedToken) -> TextDelta:
        request = self._request
        self.completion_tokens += 1
        self._observe_token()
        may_stop = self.completion_tokens > request.min_tokens
        finish_reason = token.finish_reason
        if finish_reason is not None:
            self._ended = True  # the pipeline ends it itself
        hidden = False  # the token ends the reply and is not part of its text
        if finish_reason == "stop" and token.token_id in self._eos_token_ids:
            hidden = True
        elif may_stop and token.token_id in request.stop_token_ids:
            hidden = True
            finish_reason = "stop"
        text = "" if hidden else self._detokenizer.add(token.token_id)
        if finish_reason:
            text += self._detokenizer.flush()
        text, stop_found = self._stop_strings.feed(text, check=may_stop)
        if stop_found:
            finish_reason = "stop"
        elif finish_reason:
            text += self._stop_strings.flush()
        return TextDelta(text, self.completion_tokens, finish_reason)

    def _observe_token(self) -> None:
        now = self._first_received_at if self.completion_tokens == 1 else time.monotonic()
        if self._metrics:
            if self.completion_tokens == 1:
                self._metrics.observe_first_token(now - self._arrival)
            else:
                self._metrics.observe_next_token(now - self._last_token_at)
        self._last_token_at = now

    def _finished(self, finish_reason: str) -> None:
        if self._metrics:
            self._metrics.observe_finished(finish_reason, time.monotonic() - self._arrival)
