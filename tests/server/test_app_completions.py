"""/v1/completions through the official openai client, over real HTTP, on a 2-stage cluster."""

from __future__ import annotations

from server_helpers import sse_events

PROMPT = "Tell me about the weather, the mountains"


def completion_text(client, model, stream: bool, **kwargs) -> tuple[str, str, object]:
    if not stream:
        reply = client.completions.create(model=model, prompt=kwargs.pop("prompt", PROMPT), **kwargs)
        return reply.choices[0].text, reply.choices[0].finish_reason, reply.usage
    chunks = list(
        client.completions.create(
            model=model,
            prompt=kwargs.pop("prompt", PROMPT),
            stream=True,
            stream_options={"include_usage": True},
            **kwargs,
        )
    )
    text = "".join(chunk.choices[0].text for chunk in chunks if chunk.choices)
    finish = [
        chunk.choices[0].finish_reason for chunk in chunks if chunk.choices and chunk.choices[0].finish_reason
    ]
    assert len(finish) == 1
    return text, finish[0], chunks[-1].usage


def test_streamed_text_equals_non_streamed_text_for_the_same_seed(client, model) -> None:
    whole = completion_text(client, model, stream=False, max_tokens=20, seed=11, temperature=1.0)
    streamed = completion_text(client, model, stream=True, max_tokens=20, seed=11, temperature=1.0)
    assert whole[0] and streamed[:2] == whole[:2]
    assert streamed[2].model_dump() == whole[2].model_dump()


def test_usage_counts_the_prompt_as_tokenized(client, model, cluster) -> None:
    _, finish_reason, usage = completion_text(
        client, model, stream=False, max_tokens=6, extra_body={"ignore_eos": True}
    )
    assert finish_reason == "length"
    assert usage.prompt_tokens == len(cluster.coordinator.tokenizer.encode(PROMPT))
    assert (usage.completion_tokens, usage.total_tokens) == (6, usage.prompt_tokens + 6)


def test_default_max_tokens_is_16(client, model) -> None:
    _, _, usage = completion_text(client, model, stream=False, extra_body={"ignore_eos": True})
    assert usage.completion_tokens == 16


def test_token_id_prompt_gives_the_same_text_as_the_string(client, model, cluster) -> None:
    prompt_ids = cluster.coordinator.tokenizer.encode(PROMPT)
    as_text = completion_text(client, model, stream=False, max_tokens=8, seed=2)
    as_ids = completion_text(client, model, stream=False, prompt=prompt_ids, max_tokens=8, seed=2)
    one_element_list = completion_text(client, model, stream=False, prompt=[PROMPT], max_tokens=8, seed=2)
    assert as_ids[:2] == as_text[:2] == one_element_list[:2]


def test_stop_string_cuts_the_completion(client, model) -> None:
    reference, _, _ = completion_text(
        client, model, stream=False, max_tokens=20, seed=4, extra_body={"ignore_eos": True}
    )
    stop = next(
        reference[j : j + 3]
        for j in range(1, len(reference) - 3)
        if reference.find(reference[j : j + 3]) == j
    )
    expected = reference[: reference.find(stop)]
    for stream in (False, True):
        text, finish_reason, _ = completion_text(
            client, model, stream=stream, max_tokens=20, seed=4, stop=stop, extra_body={"ignore_eos": True}
        )
        assert (text, finish_reason) == (expected, "stop"), f"stream={stream}"


def test_stream_has_openai_shape(http, model) -> None:
    body = {"model": model, "prompt": PROMPT, "max_tokens": 3, "stream": True, "ignore_eos": True}
    with http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(chunk["object"] == "text_completion" and chunk["id"].startswith("cmpl-") for chunk in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(chunk["choices"][0]["finish_reason"] is None for chunk in chunks[:-1])
