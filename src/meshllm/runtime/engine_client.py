"""What the HTTP server needs of the engine, and nothing more: the server depends on this protocol only.

The coordinator implements it over a pipeline of stages; anything else that does (a test double of the
whole engine, a future in-process engine) can serve the same API.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from meshllm.devices import DeviceStatus
from meshllm.step import GeneratedToken, SamplingParams

StepListener = Callable[[str, float], None]  # (stage name, seconds) after every step of every stage


@dataclass(frozen=True)
class ServedModel:
    """The model as clients see it."""

    name: str  # the id clients send
    root: str  # where it was loaded from (folder or hub id)
    max_context: int  # tokens: prompt plus reply
    vocab_size: int
    eos_token_ids: tuple[int, ...]


@dataclass(frozen=True)
class GenerateRequest:
    """One sequence to generate. The engine ends it on its own at the first of: an eos token (unless
    `ignore_eos`), a token of `stop_token_ids` (once `sampling.min_tokens` tokens were made), or
    `max_tokens` tokens. Either way the last token carries the finish reason."""

    prompt_ids: list[int]
    sampling: SamplingParams
    max_tokens: int
    ignore_eos: bool = False
    stop_token_ids: frozenset[int] = field(default_factory=frozenset)


class TokenStream(Protocol):
    """The tokens of one sequence; ends after the token that carries a finish reason."""

    seq_id: int

    def __aiter__(self) -> AsyncIterator[GeneratedToken]: ...


class Tokenizer(Protocol):
    """The parts of a Hugging Face tokenizer the server uses."""

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = ...) -> str: ...


class EngineClient(Protocol):
    @property
    def model(self) -> ServedModel: ...

    @property
    def tokenizer(self) -> Tokenizer: ...

    def chat_prompt_ids(self, messages: list[dict[str, Any]], template_kwargs: dict[str, Any]) -> list[int]:
        """The prompt of a conversation, rendered by the model's chat template. Raises on a conversation
        the template refuses."""
        ...

    def generate(self, request: GenerateRequest) -> TokenStream:
        """Admit a sequence. Raises PipelineUnavailable when a device is down, ValueError when the
        request cannot fit (prompt plus max_tokens over the context)."""
        ...

    def abort(self, seq_id: int) -> None:
        """End a sequence early (the client left); every stage frees its caches. Unknown ids are ignored."""
        ...

    @property
    def live_sequences(self) -> int: ...

    @property
    def waiting_sequences(self) -> int:
        """Admitted sequences that wait for room (in the KV caches, or among the running ones)."""
        ...

    def devices_snapshot(self) -> list[DeviceStatus]:
        """Every device as last seen (refreshed about once a second)."""
        ...

    async def devices(self) -> list[DeviceStatus]:
        """Ask every device now."""
        ...

    @property
    def healthy(self) -> bool:
        """Every device is up with its layers loaded: new sequences are admitted."""
        ...

    def add_step_listener(self, listener: StepListener) -> None: ...
