"""The coordinator in steady state: the engine the HTTP server talks to (`EngineClient`).

It admits sequences into the engine loop, answers for the model and its tokenizer, and reports every
device through its monitor (which also reloads a worker that restarted). `Coordinator.start(config)`
builds one (see `startup.py`); `close()` ends it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from meshllm.devices import DeviceStatus
from meshllm.models.plan import StagePlan
from meshllm.models.tokenizer import chat_prompt_ids
from meshllm.runtime.coordinator_config import CoordinatorConfig
from meshllm.runtime.engine_client import GenerateRequest, ServedModel, StepListener, Tokenizer
from meshllm.runtime.engine_loop import EngineLoop, SequenceStream
from meshllm.runtime.monitor import DeviceMonitor
from meshllm.runtime.replan import Replanner
from meshllm.step import PipelineUnavailable
from meshllm.transport.stage import LoadUpdate
from meshllm.transport.stage_client import StageClient
from meshllm.transport.weights import WeightsServer

log = logging.getLogger(__name__)


class Coordinator:
    def __init__(
        self,
        config: CoordinatorConfig,
        model: ServedModel,
        tokenizer: Any,  # a Hugging Face tokenizer, with its chat template
        replanner: Replanner,
        loop: EngineLoop,
        monitor: DeviceMonitor,
        clients: list[StageClient],
    ) -> None:
        self.config = config
        self._model = model
        self._tokenizer = tokenizer
        self.replanner = replanner
        self.loop = loop
        self.monitor = monitor
        self._clients = clients
        self._closed = False
        self.weights_server: WeightsServer | None = None  # the workers' weights, when it serves them

    @classmethod
    async def start(
        cls, config: CoordinatorConfig, on_load: Callable[[str, LoadUpdate], None] | None = None
    ) -> Coordinator:
        """Start it; `on_load(device, update)` hears how each worker's load goes."""
        from meshllm.runtime.startup import start_coordinator

        return await start_coordinator(config, on_load)

    # ---- the model -----------------------------------------------------------------------------

    @property
    def plan(self) -> list[StagePlan]:
        """The layer plan in force (without the devices left out of it)."""
        return self.replanner.plan

    @property
    def model(self) -> ServedModel:
        return self._model

    @property
    def tokenizer(self) -> Tokenizer:
        return self._tokenizer  # type: ignore[no-any-return]

    def chat_prompt_ids(self, messages: list[dict[str, Any]], template_kwargs: dict[str, Any]) -> list[int]:
        return chat_prompt_ids(self._tokenizer, messages, template_kwargs)

    # ---- generation ----------------------------------------------------------------------------

    def generate(self, request: GenerateRequest) -> SequenceStream:
        if self._closed:
            raise PipelineUnavailable("the coordinator is shutting down")
        down = self.monitor.unhealthy()
        if down:
            raise PipelineUnavailable("; ".join(status.problem() for status in down))
        if not self.replanner.settled:
            raise PipelineUnavailable(self.replanner.problem or "the layers are being planned again")
        n_prompt, max_context = len(request.prompt_ids), self._model.max_context
        if n_prompt + request.max_tokens > max_context:
            raise ValueError(
                f"prompt ({n_prompt} tokens) plus max_tokens ({request.max_tokens}) exceeds the context of "
                f"{max_context} tokens"
            )
        if not request.sampling.eos_token_ids:
            request = replace(
                request, sampling=replace(request.sampling, eos_token_ids=self._model.eos_token_ids)
            )
        return self.loop.submit(request)

    def abort(self, seq_id: int) -> None:
        self.loop.abort(seq_id)

    @property
    def live_sequences(self) -> int:
        return self.loop.live_sequences

    @property
    def waiting_sequences(self) -> int:
        return self.loop.scheduler.waiting

    def add_step_listener(self, listener: StepListener) -> None:
        self.loop.pipeline.listeners.append(listener)

    # ---- devices -------------------------------------------------------------------------------

    async def devices(self) -> list[DeviceStatus]:
        return await self.monitor.refresh()

    def devices_snapshot(self) -> list[DeviceStatus]:
        return self.monitor.snapshot()

    @property
    def healthy(self) -> bool:
        return not self.monitor.unhealthy() and self.replanner.settled

    # ---- lifecycle -----------------------------------------------------------------------------

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self.monitor.stop()
        await self.loop.close()
        for client in self._clients:
            await client.close()
        if self.weights_server is not None:
            await self.weights_server.stop()
