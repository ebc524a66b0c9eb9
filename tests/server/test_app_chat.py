"""/v1/chat/completions through the official openai client, over real HTTP, on a 2-stage cluster."""

from __future__ import annotations

import asyncio

from server_helpers import sse_events

from meshllm.models.tokenizer import chat_prompt_ids

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Tell me about the mountains and the sea."},
]


def chat_text(client, model, stream: bool, **kwargs) -> tuple[str, str, object]:
    """(content, finish_reason, usage) of one chat request, streamed or not."""
    if not stream:
        reply = client.chat.completions.create(model=model, messages=MESSAGES, **kwargs)
        return reply.choices[0].message.content, reply.choices[0].finish_reason, reply.usage
    chunks = list(
        client.chat.completions.create(
            model=model, messages=MESSAGES, stream=True, stream_options={"include_usage": True}, **kwargs
        )
    )
    content = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    finish = [
        chunk.choices[0].finish_reason for chunk in chunks if chunk.choices and chunk.choices[0].finish_reason
    ]
    assert len(finish) == 1
    return content, finish[0], chunks[-1].usage


def test_streamed_text_equals_non_streamed_text_for_the_same_seed(client, model) -> None:
    whole = chat_text(client, model, stream=False, max_tokens=24, seed=7, temperature=0.9)
    streamed = chat_text(client, model, stream=True, max_tokens=24, seed=7, temperature=0.9)
    assert whole[0] and streamed[0] == whole[0]
    assert streamed[1] == whole[1]
    assert streamed[2].model_dump() == whole[2].model_dump()


def test_usage_counts_prompt_and_completion_tokens(client, model, cluster) -> None:
    content, finish_reason, usage = chat_text(
        client, model, stream=False, max_tokens=9, seed=1, extra_body={"ignore_eos": True}
    )
    prompt_ids = chat_prompt_ids(cluster.coordinator.tokenizer, MESSAGES)
    assert finish_reason == "length"
    assert usage.prompt_tokens == len(prompt_ids)
    assert usage.completion_tokens == 9
    assert usage.total_tokens == len(prompt_ids) + 9


def test_max_completion_tokens_is_honoured(client, model) -> None:
    reply = client.chat.completions.create(
        model=model, messages=MESSAGES, max_completion_tokens=5, extra_body={"ignore_eos": True}
    )
    assert reply.usage.completion_tokens == 5 and reply.choices[0].finish_reason == "length"


def stop_inside(reference: str) -> str:
    """A 3-character piece of `reference` that first occurs after its start (so something precedes it)."""
    return next(
        reference[j : j + 3]
        for j in range(1, len(reference) - 3)
        if reference.find(reference[j : j + 3]) == j
    )


def test_stop_string_cuts_the_reply_and_is_not_emitted(client, model) -> None:
    # With this prompt the tiny model writes a run of one character, then another: the stop string spans
    # the change, so while streaming every character that may start it is held back until it cannot.
    messages = [{"role": "user", "content": "Hello!"}]
    options = {"max_tokens": 30, "seed": 3, "extra_body": {"ignore_eos": True}}
    reference = (
        client.chat.completions.create(model=model, messages=messages, **options).choices[0].message.content
    )
    stop = stop_inside(reference)
    expected = reference[: reference.find(stop)]
    assert expected, reference
    whole = client.chat.completions.create(
        model=model, messages=messages, stop=[stop, "never-there"], **options
    )
    assert (whole.choices[0].message.content, whole.choices[0].finish_reason) == (expected, "stop")
    assert whole.usage.completion_tokens < 30
    chunks = list(
        client.chat.completions.create(
            model=model, messages=messages, stop=[stop, "never-there"], stream=True, **options
        )
    )
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in chunks)
    assert streamed == expected and stop not in streamed
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_a_stop_string_that_never_occurs_changes_nothing(client, model) -> None:
    reference = chat_text(client, model, stream=False, max_tokens=12, seed=5)
    assert (
        chat_text(client, model, stream=True, max_tokens=12, seed=5, stop="never-there")[:2] == reference[:2]
    )


def test_stream_has_openai_shape(http, model) -> None:
    body = {"model": model, "messages": MESSAGES, "max_tokens": 4, "stream": True, "ignore_eos": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(chunk["object"] == "chat.completion.chunk" and chunk["model"] == model for chunk in chunks)
    assert len({chunk["id"] for chunk in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}
    assert all(set(chunk["choices"][0]["delta"]) == {"content"} for chunk in chunks[1:-1])
    assert all(chunk["choices"][0]["finish_reason"] is None for chunk in chunks[:-1])
    assert all("usage" not in chunk for chunk in chunks)  # only with stream_options.include_usage


def test_include_usage_adds_a_last_chunk_without_choices(http, model) -> None:
    body = {
        "model": model,
        "messages": MESSAGES,
        "max_tokens": 3,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    assert all(chunk["usage"] is None for chunk in events[:-2])
    assert events[-2]["choices"] == [] and events[-2]["usage"]["completion_tokens"] == 3


def test_chat_template_kwargs_reach_the_template(client, model, cluster) -> None:
    thinking = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=1)
    not_thinking = client.chat.completions.create(
        model=model,
        messages=MESSAGES,
        max_tokens=1,
        extra_body={"chat_template_kwargs": {"enable_thinking": False}},
    )
    empty_think = cluster.coordinator.tokenizer.encode("<think>\n\n</think>\n\n", add_special_tokens=False)
    assert not_thinking.usage.prompt_tokens == thinking.usage.prompt_tokens + len(empty_think)


def test_min_tokens_and_ignore_eos(client, model) -> None:
    reply = client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=7, extra_body={"min_tokens": 7, "ignore_eos": True}
    )
    assert reply.usage.completion_tokens == 7


def test_content_parts_and_developer_role_are_accepted(client, model) -> None:
    messages = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]},
    ]
    reply = client.chat.completions.create(model=model, messages=messages, max_tokens=2)
    assert reply.choices[0].message.role == "assistant"


def test_ignored_fields_are_accepted(client, model) -> None:
    reply = client.chat.completions.create(
        model=model,
        messages=MESSAGES,
        max_tokens=2,
        user="someone",
        presence_penalty=0,
        frequency_penalty=0,
        n=1,
        metadata={"k": "v"},
        store=False,
        response_format={"type": "text"},
        tool_choice="none",
    )
    assert reply.object == "chat.completion"


def test_eight_concurrent_streams_all_complete_correctly(cluster, model) -> None:
    from openai import AsyncOpenAI

    async def one(client, seed: int) -> tuple[str, str, int]:
        stream = await client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": f"Story number {seed} about the river."}],
            max_tokens=16,
            seed=seed,
            temperature=0.8,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        text, finish, usage = "", None, None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
            usage = chunk.usage or usage
        return text, finish, usage.completion_tokens

    async def main() -> tuple[list, list]:
        async with AsyncOpenAI(base_url=f"{cluster.url}/v1", api_key="unused", max_retries=0) as client:
            together = await asyncio.gather(*(one(client, seed) for seed in range(8)))
            alone = [await one(client, seed) for seed in range(8)]
        return together, alone

    together, alone = asyncio.run(main())
    assert all(finish == "length" and n_tokens == 16 for _, finish, n_tokens in together)
    assert [text for text, _, _ in together] == [text for text, _, _ in alone]


def test_non_streamed_reply_has_openai_shape(http, model) -> None:
    response = http.post("/v1/chat/completions", json={"model": model, "messages": MESSAGES, "max_tokens": 2})
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert set(body) >= {"id", "object", "created", "model", "choices", "usage"}
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["choices"][0]["finish_reason"] in ("stop", "length")


def test_model_may_be_left_out(http) -> None:
    response = http.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 1})
    assert response.status_code == 200, response.text
