"""The logic behind the API, as one line: validate -> prompt ids -> one generation -> the endpoint's reply.

No web framework here (`app` only routes). Chat, completions and Anthropic's messages differ in their
validation (messages or a prompt) and their reply format, nothing else: all start with `_start`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from pydantic import BaseModel

from meshllm.runtime.engine_client import EngineClient
from meshllm.server.anthropic import (
    CountTokensRequest,
    MessagesRequest,
    MessageStream,
    TokenCount,
    message_events,
    messages_prompt,
    validate_messages,
    whole_message,
)
from meshllm.server.errors import invalid
from meshllm.server.generation import Generation
from meshllm.server.metrics import ServerMetrics
from meshllm.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DeviceHealth,
    GpuInfoResponse,
    HealthResponse,
    ModelCard,
    ModelList,
)
from meshllm.server.replies import (
    ChatReply,
    ChoiceT,
    CompletionReply,
    EventStream,
    ReplyFormat,
    stream_payloads,
    whole_reply,
)
from meshllm.server.validation import (
    ChatPrompt,
    Prompt,
    ValidRequest,
    check_model,
    validate_chat,
    validate_completion,
)

log = logging.getLogger(__name__)

DEVICES_TIMEOUT = 5.0  # seconds /distributed/gpu-info waits for fresh answers before using the last known


class OpenAIServing:
    """Serves the OpenAI endpoints of one model from one engine client."""

    def __init__(
        self,
        client: EngineClient,
        served_model_name: str | None = None,
        metrics: ServerMetrics | None = None,
    ) -> None:
        self.client = client
        self.model_name = served_model_name or client.model.name
        self.metrics = metrics
        # Prompts are tokenized off the event loop, one at a time: a Rust tokenizer is not safe to call
        # from several threads at once.
        self._tokenize = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize")

    # ------------------------------------------------------------------------------------------ models

    def models(self) -> ModelList:
        model = self.client.model
        return ModelList(
            data=[ModelCard(id=self.model_name, root=model.root, max_model_len=model.max_context)]
        )

    def check_model(self, model: str | None) -> None:
        check_model(model, self.model_name)

    # ------------------------------------------------------------------------------------ generation

    async def chat(self, request: ChatCompletionRequest) -> BaseModel | EventStream:
        arrival = time.monotonic()
        valid = validate_chat(request, self.model_name, self.client.model)
        return await self._serve(valid, ChatReply, arrival)

    async def completion(self, request: CompletionRequest) -> BaseModel | EventStream:
        arrival = time.monotonic()
        valid = validate_completion(request, self.model_name, self.client.model)
        return await self._serve(valid, CompletionReply, arrival)

    async def messages(self, request: MessagesRequest) -> BaseModel | MessageStream:
        """Anthropic's Messages API: the chat path, replies spelled as Anthropic's."""
        arrival = time.monotonic()
        valid = validate_messages(request, self.model_name, self.client.model)
        generation = await self._start(valid, arrival)
        if valid.stream is None:
            return await whole_message(self.model_name, generation.deltas(), generation.prompt_tokens)
        events = message_events(self.model_name, generation.deltas(), generation.prompt_tokens)
        return MessageStream(events, generation.close)

    async def count_tokens(self, request: CountTokensRequest) -> TokenCount:
        """The prompt tokens a messages request would have (its `usage.input_tokens`)."""
        prompt = messages_prompt(request, self.model_name)
        return TokenCount(input_tokens=len(await self._prompt_ids(prompt)))

    async def _start(self, valid: ValidRequest, arrival: float) -> Generation:
        """The request's generation, started: a 503 unless its first token came."""
        prompt_ids = await self._prompt_ids(valid.prompt)
        generation = Generation(
            self.client, valid.sequence(prompt_ids, self.client.model), self.metrics, arrival
        )
        await generation.start()
        return generation

    async def _serve(
        self, valid: ValidRequest, reply_format: Callable[[str], ReplyFormat[ChoiceT]], arrival: float
    ) -> BaseModel | EventStream:
        generation = await self._start(valid, arrival)
        reply = reply_format(self.model_name)
        if valid.stream is None:
            return await whole_reply(reply, generation.deltas(), generation.prompt_tokens)
        payloads = stream_payloads(reply, generation.deltas(), generation.prompt_tokens, valid.stream)
        return EventStream(payloads, generation.close)

    async def _prompt_ids(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, ChatPrompt):
            render, encode_text = self.client.chat_prompt_ids, self.client.tokenizer.encode

            def chat_ids() -> list[int]:
                ids = render(prompt.messages, prompt.template_kwargs)
                if prompt.continuation:
                    ids = ids + encode_text(prompt.continuation, add_special_tokens=False)
                return ids

            try:
                return await self._in_tokenizer_thread(chat_ids)
            except Exception as error:  # the template rejects the conversation (e.g. roles out of order)
                message = f"the chat template could not render these messages: {error}"
                raise invalid(message, "messages") from None
        if isinstance(prompt, str):
            encode = self.client.tokenizer.encode
            return await self._in_tokenizer_thread(lambda: encode(prompt))
        return prompt

    async def _in_tokenizer_thread(self, work: Callable[[], list[int]]) -> list[int]:
        return await asyncio.get_running_loop().run_in_executor(self._tokenize, work)

    # ----------------------------------------------------------------------------------------- cluster

    def health(self) -> tuple[int, HealthResponse]:
        devices = self.client.devices_snapshot()
        rows = [
            DeviceHealth(name=d.name, address=d.address, status=d.status, error=d.error, in_plan=d.in_plan)
            for d in devices
        ]
        failing = [d for d in devices if d.in_plan and not d.healthy]
        left_out = [d for d in devices if not d.in_plan]
        if not failing and self.client.healthy and left_out:  # it serves, without these devices
            names = ", ".join(f"'{d.name}' ({d.address})" for d in left_out)
            message = f"serving without device {names}: " + "; ".join(d.problem() for d in left_out)
            return 200, HealthResponse(
                status="degraded", model=self.model_name, message=message, devices=rows
            )
        if not failing and self.client.healthy:
            return 200, HealthResponse(status="healthy", model=self.model_name, devices=rows)
        message = "; ".join(d.problem() for d in failing) if failing else "the pipeline is not ready"
        return 503, HealthResponse(status="unhealthy", model=self.model_name, message=message, devices=rows)

    async def gpu_info(self) -> GpuInfoResponse:
        try:
            devices = await asyncio.wait_for(self.client.devices(), DEVICES_TIMEOUT)
        except Exception as error:  # a device that does not answer in time: show the last known state
            log.warning("asking the devices failed (%s); showing the last known state", error)
            devices = self.client.devices_snapshot()
        healthy = all(device.healthy for device in devices) and self.client.healthy
        return GpuInfoResponse(
            devices=devices,
            cluster_status="healthy" if healthy else "degraded",
            world_size=len(devices),
            model=self.model_name,
            live_sequences=self.client.live_sequences,
        )
