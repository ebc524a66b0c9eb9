"""The logic behind the API: requests in, replies out. No web framework here; `app` only routes.

Chat messages are rendered with the checkpoint's chat template, completions prompts are tokenized as they
are, and both run as one `Generation` whose text deltas make either one reply or a stream of chunks.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from meshllm.server.checks import (
    refuse_unsupported_chat,
    refuse_unsupported_completion,
    stop_strings,
    template_messages,
)
from meshllm.server.errors import invalid, model_not_found, unsupported
from meshllm.server.generation import Generation, GenerationRequest
from meshllm.server.metrics import ServerMetrics
from meshllm.server.protocol import (
    AssistantMessage,
    ChatCompletionChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    DeviceHealth,
    DeviceInfo,
    GpuInfoResponse,
    HealthResponse,
    ModelCard,
    ModelList,
)
from meshllm.server.replies import chat_chunks, collect, completion_chunks, usage_of
from meshllm.step import SamplingParams

log = logging.getLogger(__name__)

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
DEVICES_TIMEOUT = 5.0  # seconds /distributed/gpu-info waits for fresh answers before using the last known
# Keys apply_chat_template sets itself; a client passing them in chat_template_kwargs would break it.
RESERVED_TEMPLATE_KWARGS = frozenset(
    {"conversation", "messages", "tokenize", "add_generation_prompt", "return_dict", "return_tensors"}
)


class EventStream:
    """A streamed reply: JSON payloads for `data:` events (without the final `[DONE]`), and `close()`."""

    def __init__(self, payloads: AsyncIterator[str], generation: Generation) -> None:
        self._payloads = payloads
        self._generation = generation

    def __aiter__(self) -> AsyncIterator[str]:
        return self._payloads

    def close(self) -> None:
        """Cancels the sequence if it is still running (the client went away); safe to call twice."""
        self._generation.close()


class OpenAIServing:
    """Serves the OpenAI endpoints of one model from one coordinator."""

    def __init__(
        self, coordinator: Any, served_model_name: str | None = None, metrics: ServerMetrics | None = None
    ) -> None:
        self.coordinator = coordinator
        self.model_name = served_model_name or coordinator.model.name
        self.metrics = metrics
        # Prompts are tokenized off the event loop, one at a time: a Rust tokenizer is not safe to call
        # from several threads at once.
        self._tokenize = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize")

    async def _in_tokenizer_thread(self, function: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._tokenize, function, *args)

    # ------------------------------------------------------------------------------------------ models

    def models(self) -> ModelList:
        root = self.coordinator.model.root
        card = ModelCard(id=self.model_name, root=root, max_model_len=self.coordinator.model.max_context)
        return ModelList(data=[card])

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise model_not_found(model, self.model_name)

    # -------------------------------------------------------------------------------------------- chat

    async def chat(self, request: ChatCompletionRequest) -> ChatCompletionResponse | EventStream:
        arrival = time.monotonic()
        self.check_model(request.model)
        refuse_unsupported_chat(request)
        messages = template_messages(request.messages)
        template_kwargs = dict(request.chat_template_kwargs or {})
        reserved = sorted(RESERVED_TEMPLATE_KWARGS & template_kwargs.keys())
        if reserved:
            raise invalid(f"chat_template_kwargs may not set {', '.join(reserved)}", "chat_template_kwargs")
        try:
            prompt_ids = await self._in_tokenizer_thread(
                self.coordinator.chat_prompt_ids, messages, template_kwargs
            )
        except Exception as error:  # the template rejects the conversation (e.g. roles out of order)
            raise invalid(f"the chat template could not render these messages: {error}", "messages") from None
        max_tokens: int | None
        if request.max_completion_tokens is not None:
            max_tokens, field = request.max_completion_tokens, "max_completion_tokens"
        else:
            max_tokens, field = request.max_tokens, "max_tokens"
        generation = await self._start(request, prompt_ids, "messages", max_tokens, field, None, arrival)
        request_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if request.stream:
            options = request.stream_options
            payloads = chat_chunks(
                generation,
                request_id,
                created,
                self.model_name,
                include_usage=bool(options and options.include_usage),
                continuous_usage=bool(options and options.continuous_usage_stats),
            )
            return EventStream(payloads, generation)
        text, finish_reason = await collect(generation)
        return ChatCompletionResponse(
            id=request_id,
            created=created,
            model=self.model_name,
            choices=[
                ChatCompletionChoice(message=AssistantMessage(content=text), finish_reason=finish_reason)
            ],
            usage=usage_of(generation),
        )

    # ------------------------------------------------------------------------------------- completions

    async def completion(self, request: CompletionRequest) -> CompletionResponse | EventStream:
        arrival = time.monotonic()
        self.check_model(request.model)
        refuse_unsupported_completion(request)
        prompt_ids = await self._completion_prompt_ids(request.prompt)
        generation = await self._start(
            request,
            prompt_ids,
            "prompt",
            request.max_tokens,
            "max_tokens",
            COMPLETIONS_DEFAULT_MAX_TOKENS,
            arrival,
        )
        request_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if request.stream:
            options = request.stream_options
            payloads = completion_chunks(
                generation,
                request_id,
                created,
                self.model_name,
                include_usage=bool(options and options.include_usage),
                continuous_usage=bool(options and options.continuous_usage_stats),
            )
            return EventStream(payloads, generation)
        text, finish_reason = await collect(generation)
        return CompletionResponse(
            id=request_id,
            created=created,
            model=self.model_name,
            choices=[CompletionChoice(text=text, finish_reason=finish_reason)],
            usage=usage_of(generation),
        )

    async def _completion_prompt_ids(
        self, prompt: str | list[str] | list[int] | list[list[int]]
    ) -> list[int]:
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            if len(prompt) != 1:
                raise unsupported(
                    "prompt",
                    "prompt must be one string or one list of token ids (send one request per prompt)",
                )
            prompt = prompt[0]
        if isinstance(prompt, str):
            tokenizer = self.coordinator.tokenizer
            prompt_ids = await self._in_tokenizer_thread(tokenizer.encode, prompt)
        else:
            prompt_ids = list(prompt)  # type: ignore[arg-type]
            self._check_token_ids(prompt_ids, "prompt")
        if not prompt_ids:
            raise invalid("prompt must not be empty", "prompt")
        return prompt_ids

    def _check_token_ids(self, token_ids: list[int], param: str) -> None:
        vocab_size = self.coordinator.model.vocab_size
        bad = [token_id for token_id in token_ids if not 0 <= token_id < vocab_size]
        if bad:
            raise invalid(f"{param}: token id {bad[0]} is outside the vocabulary [0, {vocab_size})", param)

    # ------------------------------------------------------------------------------------------ common

    async def _start(
        self,
        request: ChatCompletionRequest | CompletionRequest,
        prompt_ids: list[int],
        prompt_field: str,
        max_tokens: int | None,
        max_tokens_field: str,
        default_max_tokens: int | None,
        arrival: float,
    ) -> Generation:
        """Checks the lengths, builds the sampling parameters, submits, and waits for the first token."""
        max_tokens = self._max_tokens(
            prompt_ids, prompt_field, max_tokens, max_tokens_field, default_max_tokens
        )
        if request.min_tokens > max_tokens:
            raise invalid(
                f"min_tokens ({request.min_tokens}) is larger than {max_tokens_field} ({max_tokens})",
                "min_tokens",
            )
        stop_token_ids = list(request.stop_token_ids or [])
        self._check_token_ids(stop_token_ids, "stop_token_ids")
        sampling = SamplingParams(
            temperature=1.0 if request.temperature is None else request.temperature,
            top_p=1.0 if request.top_p is None else request.top_p,
            top_k=max(request.top_k or 0, 0),
            seed=None if request.seed is None else request.seed % 2**64,
            min_tokens=request.min_tokens,
            eos_token_ids=tuple(self.coordinator.model.eos_token_ids) + tuple(stop_token_ids),
        )
        generation = Generation(
            self.coordinator,
            GenerationRequest(
                prompt_ids=prompt_ids,
                sampling=sampling,
                max_tokens=max_tokens,
                ignore_eos=request.ignore_eos,
                min_tokens=request.min_tokens,
                stop=stop_strings(request.stop),
                stop_token_ids=frozenset(stop_token_ids),
                skip_special_tokens=request.skip_special_tokens,
            ),
            self.metrics,
            arrival,
        )
        await generation.start()
        return generation

    def _max_tokens(
        self, prompt_ids: list[int], prompt_field: str, requested: int | None, field: str, default: int | None
    ) -> int:
        """The number of tokens to generate; a 400 naming the field when the context cannot hold them."""
        max_context = self.coordinator.model.max_context
        n_prompt = len(prompt_ids)
        if n_prompt >= max_context:
            raise invalid(
                f"This model's maximum context length is {max_context} tokens, but {n_prompt} tokens are "
                f"in the {prompt_field}, leaving no room for a reply. Please shorten the {prompt_field}.",
                prompt_field,
                "context_length_exceeded",
            )
        room = max_context - n_prompt
        if requested is None:
            return room if default is None else min(default, room)
        if n_prompt + requested > max_context:
            raise invalid(
                f"This model's maximum context length is {max_context} tokens. However, you requested "
                f"{n_prompt + requested} tokens ({n_prompt} in the {prompt_field}, {requested} in the "
                f"completion). Please reduce the length of the {prompt_field} or {field} (at most {room}).",
                field,
                "context_length_exceeded",
            )
        return requested

    # ----------------------------------------------------------------------------------------- cluster

    def health(self) -> tuple[int, HealthResponse]:
        devices = self.coordinator.devices_snapshot()
        rows = [DeviceHealth(name=d.name, address=d.address, status=d.status, error=d.error) for d in devices]
        failing = [d for d in devices if d.status != "healthy"]
        if not failing and self.coordinator.healthy:
            return 200, HealthResponse(status="healthy", model=self.model_name, devices=rows)
        if failing:
            message = "; ".join(d.error or f"device '{d.name}' ({d.address}) is {d.status}" for d in failing)
        else:
            message = "the pipeline is not ready"
        return 503, HealthResponse(status="unhealthy", model=self.model_name, message=message, devices=rows)

    async def gpu_info(self) -> GpuInfoResponse:
        try:
            devices = await asyncio.wait_for(self.coordinator.devices(), DEVICES_TIMEOUT)
        except Exception as error:  # a device that does not answer in time: show the last known state
            log.warning("asking the devices failed (%s); showing the last known state", error)
            devices = self.coordinator.devices_snapshot()
        rows = [
            DeviceInfo(
                device_id=d.device_id,
                name=d.name,
                hostname=d.hostname,
                address=d.address,
                role=d.role,
                status=d.status,
                engine=d.engine,
                device_type=d.device_type,
                memory_total=d.memory_total,
                memory_available=d.memory_available,
                weight_bytes=d.weight_bytes,
                layers=tuple(d.layers),
                live_sequences=d.live_sequences,
                rtt_ms=d.rtt_ms,
                version=d.version,
                error=d.error,
            )
            for d in devices
        ]
        healthy = all(row.status == "healthy" for row in rows) and self.coordinator.healthy
        return GpuInfoResponse(
            devices=rows,
            cluster_status="healthy" if healthy else "degraded",
            world_size=len(rows),
            model=self.model_name,
            live_sequences=self.coordinator.live_sequences,
        )
