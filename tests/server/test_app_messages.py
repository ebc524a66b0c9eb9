"""/v1/messages (Anthropic's Messages API) through the official anthropic client, over real HTTP, on the
2-stage cluster: the same text as /v1/chat/completions, exact usage, the event sequence, errors."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fake_engine import FakeEngine, tokens
from server_helpers import API_KEY, ClusterServer, wait_until

from meshllm.models.tokenizer import chat_prompt_ids
from meshllm.server.anthropic import MessagesRequest, MessageStream
from meshllm.server.serving import OpenAIServing
from meshllm.step import PipelineError

SYSTEM = "You are terse."
USER = [{"role": "user", "content": "Tell me about the mountains and the sea."}]
CHAT = [{"role": "system", "content": SYSTEM}, *USER]
GREEDY = {"temperature": 0}
SEEDED = {"temperature": 0.9, "seed": 7}
STOP_REASONS = {"length": "max_tokens", "stop": "end_turn"}


@pytest.fixture(scope="module")
def cluster(tiny_checkpoint: Callable[..., Path]) -> Iterator[ClusterServer]:
    """A 2-stage cluster of its own: a llama checkpoint, whose random weights write varied text (the shared
    qwen3 one's tied embeddings repeat the prompt's last token), so that equal texts mean something."""
    server = ClusterServer(tiny_checkpoint(arch="llama", layers=4, seed=1)).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def http(cluster: ClusterServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=cluster.url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def client(cluster: ClusterServer) -> Any:
    from openai import OpenAI

    return OpenAI(base_url=f"{cluster.url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model(cluster: ClusterServer) -> str:
    return cluster.coordinator.model.name


@pytest.fixture(scope="module")
def claude(cluster: ClusterServer) -> Iterator[Any]:
    from anthropic import Anthropic

    with Anthropic(base_url=cluster.url, api_key="unused", max_retries=0, timeout=60) as client:
        yield client


def chat_reply(client, model, max_tokens: int, sampling: dict) -> tuple[str, str, Any]:
    reply = client.chat.completions.create(model=model, messages=CHAT, max_tokens=max_tokens, **sampling)
    return reply.choices[0].message.content, reply.choices[0].finish_reason, reply.usage


def events_of(response: httpx.Response) -> list[tuple[str, dict]]:
    """(event name, JSON data) of each named SSE event; every line is checked to be one of the two."""
    events, name = [], None
    for line in response.iter_lines():
        if line.startswith("event: "):
            name = line[len("event: ") :]
        elif line.startswith("data: "):
            assert name is not None, "data before its event line"
            events.append((name, json.loads(line[len("data: ") :])))
            name = None
        else:
            assert line == "", f"unexpected SSE line {line!r}"
    return events


# Greedy, and sampled with a seed (an extension on /v1/messages, as on chat).
SAMPLINGS = [GREEDY, SEEDED]


@pytest.mark.parametrize("sampling", SAMPLINGS, ids=["greedy", "seeded"])
def test_text_and_usage_equal_chat_completions_not_streamed(claude, client, model, cluster, sampling) -> None:
    text, finish_reason, usage = chat_reply(client, model, 24, sampling)
    reply = claude.messages.create(
        model=model,
        system=SYSTEM,
        messages=USER,
        max_tokens=24,
        metadata={"user_id": "u1"},
        extra_body=sampling,
    )
    assert text and [block.text for block in reply.content] == [text]
    assert (reply.type, reply.role, reply.model) == ("message", "assistant", model)
    assert reply.id.startswith("msg_")
    assert reply.stop_reason == STOP_REASONS[finish_reason] and reply.stop_sequence is None
    assert (
        reply.usage.input_tokens
        == usage.prompt_tokens
        == len(chat_prompt_ids(cluster.coordinator.tokenizer, CHAT))
    )
    assert reply.usage.output_tokens == usage.completion_tokens


@pytest.mark.parametrize("sampling", SAMPLINGS, ids=["greedy", "seeded"])
def test_text_and_usage_equal_chat_completions_streamed(claude, client, model, sampling) -> None:
    text, finish_reason, usage = chat_reply(client, model, 24, sampling)
    system = [{"type": "text", "text": SYSTEM, "cache_control": {"type": "ephemeral"}}]
    with claude.messages.stream(
        model=model, system=system, messages=USER, max_tokens=24, extra_body=sampling
    ) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed == text and [block.text for block in final.content] == [text]
    assert final.stop_reason == STOP_REASONS[finish_reason]
    assert (final.usage.input_tokens, final.usage.output_tokens) == (
        usage.prompt_tokens,
        usage.completion_tokens,
    )


def test_a_seeded_reply_is_varied_text(claude, model) -> None:
    text = (
        claude.messages.create(model=model, messages=USER, max_tokens=24, extra_body=SEEDED).content[0].text
    )
    assert len(set(text)) > 3, text  # the comparisons above are about more than one repeated token


def test_max_tokens_ends_the_reply_with_exact_output_tokens(claude, model) -> None:
    reply = claude.messages.create(model=model, messages=USER, max_tokens=5, extra_body=GREEDY)
    assert (reply.stop_reason, reply.usage.output_tokens) == ("max_tokens", 5)


def test_the_stream_is_anthropics_event_sequence(http, model) -> None:
    body = {"model": model, "messages": USER, "max_tokens": 12, "temperature": 0, "stream": True}
    whole = http.post("/v1/messages", json={**body, "stream": False}).json()
    with http.stream("POST", "/v1/messages", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = events_of(response)
    names = [name for name, _ in events]
    assert all(name == data["type"] for name, data in events)
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(names[3:-3]) == {"content_block_delta"}
    start = events[0][1]["message"]
    assert (start["content"], start["stop_reason"], start["model"]) == ([], None, model)
    assert start["usage"]["input_tokens"] == whole["usage"]["input_tokens"]
    assert events[1][1] == {
        "type": "content_block_start",
        "index": 0,
        "content_block": {"type": "text", "text": ""},
    }
    deltas = [data for name, data in events if name == "content_block_delta"]
    assert all(d["index"] == 0 and d["delta"]["type"] == "text_delta" for d in deltas)
    assert "".join(d["delta"]["text"] for d in deltas) == whole["content"][0]["text"]
    message_delta = events[-2][1]
    assert message_delta["delta"] == {"stop_reason": whole["stop_reason"], "stop_sequence": None}
    assert message_delta["usage"]["output_tokens"] == whole["usage"]["output_tokens"]


def stop_inside(reference: str) -> str:
    """A 2-character piece of `reference` first occurring after its start (so some text precedes it)."""
    return next(
        reference[j : j + 2]
        for j in range(1, len(reference) - 2)
        if reference.find(reference[j : j + 2]) == j
    )


@pytest.mark.parametrize("stream", [False, True])
def test_a_stop_sequence_cuts_the_reply_and_is_named(claude, model, stream) -> None:
    hello = [{"role": "user", "content": "Hello!"}]
    options = {
        "model": model,
        "messages": hello,
        "max_tokens": 30,
        "extra_body": {"temperature": 1.0, "seed": 3},
    }
    reference = claude.messages.create(**options).content[0].text
    stop = stop_inside(reference)
    stops = ["never-in-this-reply", stop]
    if stream:
        with claude.messages.stream(**options, stop_sequences=stops) as events:
            text = "".join(events.text_stream)
            reply = events.get_final_message()
    else:
        reply = claude.messages.create(**options, stop_sequences=stops)
        text = reply.content[0].text
    assert text == reference[: reference.find(stop)] == reply.content[0].text
    assert (reply.stop_reason, reply.stop_sequence) == ("stop_sequence", stop)
    assert 0 < reply.usage.output_tokens < 30


def test_top_k_and_top_p_reach_the_sampler(claude, model) -> None:
    # The SDK types no sampling fields (newer models fix them); clients send them as body fields.
    def text(**sampling: Any) -> str:
        return (
            claude.messages.create(model=model, messages=USER, max_tokens=8, extra_body=sampling)
            .content[0]
            .text
        )

    greedy = text(temperature=0)
    assert text(temperature=1.0, seed=5) != greedy
    assert text(temperature=1.0, seed=5, top_k=1) == greedy  # top_k=1 leaves only the greedy token
    assert text(temperature=1.0, seed=5, top_p=1e-6) == greedy  # so does a tiny nucleus


@pytest.mark.parametrize("stream", [False, True])
def test_a_final_assistant_message_is_a_prefill_the_reply_continues(
    claude, http, model, cluster, stream
) -> None:
    # The same prompt as token ids on /v1/completions: the rendered conversation, then the prefill's tokens.
    prefill = "The mountains"
    tokenizer = cluster.coordinator.tokenizer
    prompt_ids = chat_prompt_ids(tokenizer, CHAT) + tokenizer.encode(prefill, add_special_tokens=False)
    completion = http.post(
        "/v1/completions", json={"prompt": prompt_ids, "max_tokens": 16, "temperature": 0}
    ).json()
    messages = [*USER, {"role": "assistant", "content": [{"type": "text", "text": prefill}]}]
    options = {"model": model, "system": SYSTEM, "messages": messages, "max_tokens": 16, "extra_body": GREEDY}
    if stream:
        with claude.messages.stream(**options) as events:
            text = "".join(events.text_stream)
            reply = events.get_final_message()
    else:
        reply = claude.messages.create(**options)
        text = reply.content[0].text
    assert text == completion["choices"][0]["text"] == reply.content[0].text  # without the prefill itself
    assert reply.usage.input_tokens == completion["usage"]["prompt_tokens"] == len(prompt_ids)
    assert reply.usage.output_tokens == completion["usage"]["completion_tokens"]


def test_count_tokens_is_the_replys_input_tokens(claude, model, cluster) -> None:
    counted = claude.messages.count_tokens(model=model, system=SYSTEM, messages=USER)
    assert counted.input_tokens == len(chat_prompt_ids(cluster.coordinator.tokenizer, CHAT))


# ---------------------------------------------------------------------------------------------- errors

TOOL = {"name": "f", "description": "d", "input_schema": {"type": "object"}}
IMAGE = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}


def request(**fields: Any) -> dict:
    return {"model": "MODEL", "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 2, **fields}


# (JSON body, status, error type, a piece of the message)
BAD_REQUESTS = [
    ({"model": "MODEL", "messages": USER}, 400, "invalid_request_error", "max_tokens"),
    ({"messages": USER, "max_tokens": 2}, 400, "invalid_request_error", "model"),
    (request(max_tokens=0), 400, "invalid_request_error", "max_tokens"),
    (request(temperature=1.5), 400, "invalid_request_error", "temperature"),
    (request(top_k=-1), 400, "invalid_request_error", "top_k"),
    (request(messages=[]), 400, "invalid_request_error", "messages"),
    (
        request(messages=[{"role": "system", "content": "x"}]),
        400,
        "invalid_request_error",
        "messages[0].role",
    ),
    (request(foo=1), 400, "invalid_request_error", "foo"),
    (request(tools=[TOOL]), 400, "invalid_request_error", "tools"),
    (request(tool_choice={"type": "any"}), 400, "invalid_request_error", "tool_choice"),
    (
        request(output_config={"format": {"type": "json_schema"}}),
        400,
        "invalid_request_error",
        "output_config",
    ),
    (request(thinking={"type": "enabled", "budget_tokens": 1024}), 400, "invalid_request_error", "thinking"),
    (
        request(messages=[{"role": "user", "content": [{"type": "text", "text": "see"}, IMAGE]}]),
        400,
        "invalid_request_error",
        "messages[0].content[1]: content of type 'image'",
    ),
    (
        request(
            messages=[
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "document",
                            "source": {"type": "text", "data": "x", "media_type": "text/plain"},
                        }
                    ],
                }
            ]
        ),
        400,
        "invalid_request_error",
        "'document'",
    ),
    (
        request(
            messages=[
                {"role": "user", "content": "x"},
                {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": "1"}]},
            ]
        ),
        400,
        "invalid_request_error",
        "messages[1].content[0]: content of type 'tool_use'",
    ),
    (request(system=[IMAGE]), 400, "invalid_request_error", "system[0]"),
    (
        request(messages=[{"role": "user", "content": "x"}, {"role": "assistant", "content": "y "}]),
        400,
        "invalid_request_error",
        "messages[1]: final assistant content cannot end with trailing whitespace",
    ),
    (request(stop_sequences=[""]), 400, "invalid_request_error", "stop_sequences"),
    (request(max_tokens=100_000), 400, "invalid_request_error", "max_tokens"),
    (request(model="claude-sonnet-4-5"), 404, "not_found_error", "claude-sonnet-4-5"),
]


def assert_anthropic_error(response: httpx.Response, status: int, kind: str) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"type", "error"} and body["type"] == "error"
    assert set(body["error"]) == {"type", "message"} and body["error"]["type"] == kind
    assert body["error"]["message"] and "Traceback" not in body["error"]["message"]
    return body["error"]["message"]


@pytest.mark.parametrize(("body", "status", "kind", "message"), BAD_REQUESTS)
def test_bad_request_gets_an_anthropic_error_naming_the_field(
    http, model, body, status, kind, message
) -> None:
    body = {key: (model if value == "MODEL" else value) for key, value in body.items()}
    for stream in (False, True):
        text = assert_anthropic_error(
            http.post("/v1/messages", json={**body, "stream": stream}), status, kind
        )
        assert message in text, text


def test_malformed_json_unknown_paths_and_methods_are_anthropic_errors(http) -> None:
    bad_json = http.post(
        "/v1/messages", content=b'{"messages": [', headers={"content-type": "application/json"}
    )
    assert "not valid JSON" in assert_anthropic_error(bad_json, 400, "invalid_request_error")
    assert_anthropic_error(http.post("/v1/messages/nothing-here", json={}), 404, "not_found_error")
    assert_anthropic_error(http.get("/v1/messages"), 405, "invalid_request_error")


def test_the_anthropic_client_raises_its_own_errors(claude, model) -> None:
    import anthropic

    with pytest.raises(anthropic.BadRequestError) as refused:
        claude.messages.create(model=model, messages=USER, max_tokens=2, tools=[TOOL])
    assert refused.value.body["error"]["type"] == "invalid_request_error"
    assert "tools" in refused.value.body["error"]["message"]
    with pytest.raises(anthropic.NotFoundError):
        claude.messages.create(model="claude-opus-4-1", messages=USER, max_tokens=2)


def test_the_api_key_is_taken_as_x_api_key_or_bearer(cluster, model) -> None:
    from anthropic import Anthropic, AuthenticationError

    with httpx.Client(base_url=cluster.keyed_url, timeout=30) as keyed:
        body = request(model=model)
        message = assert_anthropic_error(keyed.post("/v1/messages", json=body), 401, "authentication_error")
        assert "x-api-key" in message
        wrong = {"x-api-key": "wrong"}
        assert_anthropic_error(
            keyed.post("/v1/messages", json=body, headers=wrong), 401, "authentication_error"
        )
        assert keyed.post("/v1/messages", json=body, headers={"x-api-key": API_KEY}).status_code == 200
        right_bearer = {"Authorization": f"Bearer {API_KEY}"}
        assert keyed.post("/v1/messages", json=body, headers=right_bearer).status_code == 200
        # Anthropic's header serves the OpenAI routes too.
        chat = {"messages": USER, "max_tokens": 1}
        assert (
            keyed.post("/v1/chat/completions", json=chat, headers={"x-api-key": API_KEY}).status_code == 200
        )
    with Anthropic(base_url=cluster.keyed_url, api_key=API_KEY, max_retries=0) as good:
        assert good.messages.create(model=model, messages=USER, max_tokens=1).usage.output_tokens == 1
    with Anthropic(base_url=cluster.keyed_url, auth_token=API_KEY, max_retries=0) as bearer:
        assert bearer.messages.create(model=model, messages=USER, max_tokens=1).content
    with Anthropic(base_url=cluster.keyed_url, api_key="bad", max_retries=0) as bad:
        with pytest.raises(AuthenticationError):
            bad.messages.create(model=model, messages=USER, max_tokens=1)


def test_the_server_keeps_serving_after_bad_requests(http, model, cluster) -> None:
    for body, *_ in BAD_REQUESTS:
        http.post("/v1/messages", json=body)
    assert http.post("/v1/messages", json=request(model=model)).status_code == 200
    assert wait_until(lambda: cluster.call(lambda: cluster.coordinator.live_sequences) == 0, timeout=2)


def test_a_pipeline_failure_mid_stream_ends_with_an_overloaded_error_event() -> None:
    # The engine fails after two tokens (a fake engine: killing a worker mid-reply is test_app_worker_failure's).
    engine = FakeEngine(tokens("ab"), error=PipelineError("stage worker1 was lost"))
    body = MessagesRequest.model_validate(request(model="fake", max_tokens=10, stream=True))

    async def collect() -> list[str]:
        stream = await OpenAIServing(engine).messages(body)
        assert isinstance(stream, MessageStream)
        return [event async for event in stream]

    events = asyncio.run(collect())
    names = [event.split("\n", 1)[0] for event in events]
    assert names[:3] == ["event: message_start", "event: content_block_start", "event: ping"]
    assert names[-1] == "event: error" and "message_stop" not in "".join(names)
    error = json.loads(events[-1].split("data: ", 1)[1])
    assert error == {
        "type": "error",
        "error": {"type": "overloaded_error", "message": "stage worker1 was lost"},
    }


def test_an_unexpected_error_is_a_500_api_error() -> None:
    from fastapi.testclient import TestClient

    from meshllm.server.app import build_app

    engine = FakeEngine()
    engine.refuse = RuntimeError("a bug")  # not an error the request path knows: the last handler's
    with TestClient(build_app(engine), raise_server_exceptions=False) as app:
        response = app.post("/v1/messages", json=request(model="fake"))
    message = assert_anthropic_error(response, 500, "api_error")
    assert "RuntimeError: a bug" in message
