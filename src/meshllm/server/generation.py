"""One sequence on the engine, seen as text: submit, wait for the first token, then text deltas.

Shared by chat and completions, streamed or not: each reply is the concatenation of the same deltas. The
engine ends the sequence on every token condition (eos, `stop_token_ids`, `max_tokens`); what is left
here is about text: detokenising, and cutting at stop strings.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from meshllm.runtime.engine_client import EngineClient, GenerateRequest, TokenStream
from meshllm.server.errors import invalid, unavailable
from meshllm.server.metrics import ServerMetrics
from meshllm.server.text import IncrementalDetokenizer, StopStrings
from meshllm.step import FinishReason, GeneratedToken, PipelineError, PipelineUnavailable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SequenceRequest:
    """A validated request: the sequence the engine generates, and what becomes of its text here."""

    generate: GenerateRequest
    stop: tuple[str, ...] = ()  # stop strings, looked for once `min_tokens` tokens were made
    skip_special_tokens: bool = True

    @property
    def min_tokens(self) -> int:
        return self.generate.sampling.min_tokens


@dataclass(frozen=True)
class TextDelta:
    text: str
    completion_tokens: int  # generated so far, this one included
    finish_reason: FinishReason | None = None  # on the last delta
    stop_string: str | None = None  # on the last delta, when a stop string ended the reply: which one


class Generation:
    """Drives one sequence: `await start()`, then `async for delta in deltas()`; `close()` always."""

    def __init__(
        self,
        client: EngineClient,
        request: SequenceRequest,
        metrics: ServerMetrics | None = None,
        arrival: float | None = None,
    ) -> None:
        self._client = client
        self._request = request
        self._metrics = metrics
        self._arrival = time.monotonic() if arrival is None else arrival
        self._detokenizer = IncrementalDetokenizer(
            client.tokenizer, request.generate.prompt_ids, request.skip_special_tokens
        )
        self._stop_strings = StopStrings(request.stop)
        self._stream: TokenStream | None = None
        self._tokens: AsyncIterator[GeneratedToken] | None = None
        self._first: GeneratedToken | None = None
        self._last_token_at = 0.0
        self._first_received_at = 0.0
        self._ended = False  # the engine is done with the sequence: nothing to abort
        self.completion_tokens = 0

    @property
    def prompt_tokens(self) -> int:
        return len(self._request.generate.prompt_ids)

    @property
    def seq_id(self) -> int | None:
        return None if self._stream is None else self._stream.seq_id

    async def start(self) -> None:
        """Submits the sequence and waits for its first token. An engine that cannot serve it is a 503."""
        try:
            self._stream = self._client.generate(self._request.generate)
        except PipelineUnavailable as error:
            raise unavailable(str(error)) from None
        except ValueError as error:
            raise invalid(str(error)) from None
        if self._metrics:
            self._metrics.observe_prompt(self.prompt_tokens)
        self._tokens = aiter(self._stream)
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
        except PipelineError as error:
            log.warning("sequence %s failed: %s", self.seq_id, error)
            self._ended = True
            self._finished("error")
            raise
        finally:
            self.close()

    def close(self) -> None:
        """Aborts the sequence unless the engine already finished it, so every stage frees its cache."""
        if self._stream is not None and not self._ended:
            self._ended = True
            try:
                self._client.abort(self._stream.seq_id)
            except Exception:  # closing must never fail a request that is already over
                log.exception("aborting sequence %s failed", self._stream.seq_id)

    def _on_token(self, token: GeneratedToken) -> TextDelta:
        self.completion_tokens += 1
        self._observe_token()
        finish_reason = token.finish_reason
        if finish_reason is not None:
            self._ended = True  # the engine ends it itself
        # A token that ends the reply with "stop" is an eos or stop token: not part of the text.
        text = "" if finish_reason == "stop" else self._detokenizer.add(token.token_id)
        if finish_reason:
            text += self._detokenizer.flush()
        may_stop = self.completion_tokens > self._request.min_tokens
        text, stop_found = self._stop_strings.feed(text, check=may_stop)
        if stop_found:
            finish_reason = "stop"
        elif finish_reason:
            text += self._stop_strings.flush()
        stop_string = self._stop_strings.matched if stop_found else None
        return TextDelta(text, self.completion_tokens, finish_reason, stop_string)

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
