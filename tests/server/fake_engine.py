"""An in-process stand-in for the engine behind the server (an `EngineClient`): it plays back scripted
tokens, records what it was asked, and needs no processes, so the request path can be tested alone.

Its tokenizer spells token id i (1 to 26) as the i-th letter, 27 as a space and 0 as the special
"<eos>" (left out when special tokens are skipped).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

from meshllm.devices import DeviceStatus
from meshllm.runtime.engine_client import GenerateRequest, ServedModel, StepListener
from meshllm.step import FinishReason, GeneratedToken, LayerRange

EOS = 0
SPACE = 27
MODEL = ServedModel(name="fake", root="/models/fake", max_context=64, vocab_size=30, eos_token_ids=(EOS,))


class FakeTokenizer:
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [SPACE if char == " " else ord(char) - ord("a") + 1 for char in text]

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        pieces = []
        for token_id in token_ids:
            if token_id == EOS:
                pieces.append("" if skip_special_tokens else "<eos>")
            elif token_id == SPACE:
                pieces.append(" ")
            else:
                pieces.append(chr(ord("a") + token_id - 1))
        return "".join(pieces)


TOKENIZER = FakeTokenizer()


def tokens(
    text: str, finish_reason: FinishReason | None = None, last: int | None = None
) -> list[GeneratedToken]:
    """The tokens of `text` as the engine hands them over; `last` (a token id) is appended to carry the
    finish reason, else the text's own last token carries it."""
    token_ids = TOKENIZER.encode(text) + ([] if last is None else [last])
    generated = [GeneratedToken(token_id, -1.0) for token_id in token_ids]
    if finish_reason is not None:
        generated[-1] = GeneratedToken(generated[-1].token_id, -1.0, finish_reason)
    return generated


class FakeStream:
    def __init__(self, seq_id: int, script: list[GeneratedToken], error: BaseException | None) -> None:
        self.seq_id = seq_id
        self._script = script
        self._error = error

    async def _play(self) -> AsyncIterator[GeneratedToken]:
        for token in self._script:
            yield token
        if self._error is not None:
            raise self._error

    def __aiter__(self) -> AsyncIterator[GeneratedToken]:
        return self._play()


def device(device_id: int, name: str, status: str = "healthy", error: str = "") -> DeviceStatus:
    return DeviceStatus(
        device_id=device_id,
        name=name,
        hostname="host",
        address="local" if device_id == 0 else f"127.0.0.1:{50050 + device_id}",
        role="coordinator" if device_id == 0 else "worker",
        status=status,  # type: ignore[arg-type]
        engine="torch",
        device_type="cpu",
        memory_total=2000,
        memory_available=1000,
        weight_bytes=100,
        layers=LayerRange(2 * device_id, 2 * device_id + 2),
        live_sequences=0,
        rtt_ms=None if device_id == 0 else 0.5,
        version="0.1.0",
        error=error,
    )


class FakeEngine:
    """Each `generate` plays the next script, then raises `error` if set; or refuses with `refuse`."""

    def __init__(self, *scripts: list[GeneratedToken], error: BaseException | None = None) -> None:
        self.model = MODEL
        self.tokenizer = TOKENIZER
        self.scripts = list(scripts)
        self.error = error
        self.refuse: Exception | None = None  # raised by generate, e.g. PipelineUnavailable
        self.requests: list[GenerateRequest] = []
        self.aborted: list[int] = []
        self.listeners: list[StepListener] = []
        self.devices_now = [device(0, "coordinator"), device(1, "worker1")]
        self.healthy = True
        self.live_sequences = 0
        self.waiting_sequences = 0

    def chat_prompt_ids(self, messages: list[dict[str, Any]], template_kwargs: dict[str, Any]) -> list[int]:
        if template_kwargs.get("fail"):
            raise ValueError("roles must alternate")
        return self.tokenizer.encode(" ".join(message["content"] for message in messages))

    def generate(self, request: GenerateRequest) -> FakeStream:
        if self.refuse is not None:
            raise self.refuse
        self.requests.append(request)
        script = self.scripts.pop(0) if self.scripts else []
        return FakeStream(len(self.requests), script, self.error)

    def abort(self, seq_id: int) -> None:
        self.aborted.append(seq_id)

    def devices_snapshot(self) -> list[DeviceStatus]:
        return list(self.devices_now)

    async def devices(self) -> list[DeviceStatus]:
        return list(self.devices_now)

    def add_step_listener(self, listener: StepListener) -> None:
        self.listeners.append(listener)
