"""The request path end to end (`server/serving.py`) against a fake engine: what reaches the engine, what
comes back, and the cluster endpoints' view of its devices."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from fake_engine import EOS, FakeEngine, device, tokens

from meshllm.server.errors import APIError
from meshllm.server.protocol import ChatCompletionRequest, CompletionRequest
from meshllm.server.replies import EventStream
from meshllm.server.serving import OpenAIServing


def chat_request(**fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}], **fields})


def test_a_chat_request_reaches_the_engine_as_a_generate_request() -> None:
    engine = FakeEngine(tokens("ok", "stop", last=EOS))
    serving = OpenAIServing(engine)
    reply = asyncio.run(serving.chat(chat_request(max_tokens=5, stop_token_ids=[3], ignore_eos=True)))
    (request,) = engine.requests
    assert request.prompt_ids == engine.tokenizer.encode("hi")
    assert (request.max_tokens, request.ignore_eos, request.stop_token_ids) == (5, True, frozenset({3}))
    body = reply.model_dump(mode="json")
    assert body["model"] == "fake" and body["choices"][0]["message"]["content"] == "ok"
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}


def test_a_completion_prompt_is_tokenized_and_served_under_the_given_name() -> None:
    engine = FakeEngine(tokens("xyz", "length"))
    serving = OpenAIServing(engine, served_model_name="alias")
    request = CompletionRequest.model_validate({"model": "alias", "prompt": "abc", "max_tokens": 3})
    body = asyncio.run(serving.completion(request)).model_dump(mode="json")
    assert engine.requests[0].prompt_ids == [1, 2, 3]
    assert (body["model"], body["choices"][0]["text"], body["choices"][0]["finish_reason"]) == (
        "alias",
        "xyz",
        "length",
    )


def test_a_streamed_request_is_an_event_stream_whose_close_aborts_the_sequence() -> None:
    engine = FakeEngine(tokens("abcdef", "length"))

    async def main() -> list[str]:
        stream = await OpenAIServing(engine).chat(chat_request(stream=True))
        assert isinstance(stream, EventStream)
        payloads = []
        async for payload in stream:
            payloads.append(payload)
            if len(payloads) == 2:
                break
        stream.close()
        return payloads

    payloads = asyncio.run(main())
    assert json.loads(payloads[1])["choices"][0]["delta"] == {"content": "a"}
    assert engine.aborted == [1]


def test_a_conversation_the_template_refuses_is_a_400_on_messages() -> None:
    with pytest.raises(APIError) as caught:
        asyncio.run(OpenAIServing(FakeEngine()).chat(chat_request(chat_template_kwargs={"fail": True})))
    assert (caught.value.status, caught.value.param) == (400, "messages")
    assert "roles must alternate" in caught.value.message


def test_models_lists_the_served_model_with_its_root_and_context() -> None:
    card = OpenAIServing(FakeEngine()).models().data[0]
    assert (card.id, card.root, card.max_model_len) == ("fake", "/models/fake", 64)


def test_health_names_every_device_that_is_not_healthy() -> None:
    engine = FakeEngine()
    serving = OpenAIServing(engine)
    assert serving.health()[0] == 200
    engine.devices_now[1] = device(1, "worker1", "unreachable")
    engine.healthy = False
    status, body = serving.health()
    assert (status, body.status) == (503, "unhealthy")
    assert body.message == "device 'worker1' (127.0.0.1:50051) is unreachable"
    assert [row.status for row in body.devices] == ["healthy", "unreachable"]


def test_gpu_info_rows_are_the_engine_s_device_statuses() -> None:
    engine = FakeEngine()
    info = asyncio.run(OpenAIServing(engine).gpu_info())
    assert info.devices == engine.devices_now
    assert (info.cluster_status, info.world_size, info.model) == ("healthy", 2, "fake")
    assert info.model_dump(mode="json")["devices"][1]["layers"] == [2, 4]
