"""Bad requests get OpenAI-shaped errors naming the field, never a 500; the server keeps serving."""

from __future__ import annotations

import httpx
import pytest
from server_helpers import API_KEY, wait_until

USER = [{"role": "user", "content": "Hello!"}]


def chat(**fields) -> dict:
    return {"messages": USER, "max_tokens": 2, **fields}


# (path, JSON body, status, param, a piece of the message)
BAD_REQUESTS = [
    ("/v1/chat/completions", {"model": "MODEL"}, 400, "messages", "Missing required parameter"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages", "valid list"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages", "at least one message"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content", ""),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role", ""),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, 400, "messages[0].content", "required"),
    ("/v1/chat/completions", chat(max_tokens=0), 400, "max_tokens", "greater than or equal to 1"),
    ("/v1/chat/completions", chat(max_tokens=-5), 400, "max_tokens", ""),
    ("/v1/chat/completions", chat(max_tokens="10"), 400, "max_tokens", "integer"),
    ("/v1/chat/completions", chat(max_completion_tokens=0), 400, "max_completion_tokens", ""),
    ("/v1/chat/completions", chat(temperature="hot"), 400, "temperature", "number"),
    ("/v1/chat/completions", chat(temperature=3), 400, "temperature", "less than or equal to 2"),
    ("/v1/chat/completions", chat(top_p=0), 400, "top_p", ""),
    ("/v1/chat/completions", chat(stream="yes"), 400, "stream", "boolean"),
    ("/v1/chat/completions", chat(model="gpt-4o"), 404, "model", "gpt-4o"),
    ("/v1/chat/completions", chat(n=2), 400, "n", "n=1"),
    (
        "/v1/chat/completions",
        chat(tools=[{"type": "function", "function": {"name": "f"}}]),
        400,
        "tools",
        "tools",
    ),
    ("/v1/chat/completions", chat(tool_choice="required"), 400, "tool_choice", ""),
    ("/v1/chat/completions", chat(logprobs=True), 400, "logprobs", "logprobs"),
    ("/v1/chat/completions", chat(top_logprobs=3), 400, "top_logprobs", ""),
    ("/v1/chat/completions", chat(presence_penalty=0.5), 400, "presence_penalty", ""),
    ("/v1/chat/completions", chat(logit_bias={"5": 10}), 400, "logit_bias", ""),
    ("/v1/chat/completions", chat(response_format={"type": "json_object"}), 400, "response_format", ""),
    ("/v1/chat/completions", chat(foo=1), 400, "foo", "Unrecognized request argument supplied: foo"),
    ("/v1/chat/completions", chat(max_tokens=100_000), 400, "max_tokens", "maximum context length"),
    ("/v1/chat/completions", chat(stream_options={"include_usage": True}), 400, "stream_options", "stream"),
    ("/v1/chat/completions", chat(stop=""), 400, "stop", "empty"),
    ("/v1/chat/completions", chat(min_tokens=5), 400, "min_tokens", "max_tokens"),
    (
        "/v1/chat/completions",
        chat(chat_template_kwargs={"tokenize": True}),
        400,
        "chat_template_kwargs",
        "tokenize",
    ),
    ("/v1/chat/completions", chat(stream=True, max_tokens=0), 400, "max_tokens", ""),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        400,
        "messages[0].content[0]",
        "image_url",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "tool", "content": "x"}]},
        400,
        "messages[0].role",
        "tool",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "word " * 3000}]},
        400,
        "messages",
        "context",
    ),
    ("/v1/completions", {"max_tokens": 2}, 400, "prompt", "Missing required parameter"),
    ("/v1/completions", {"prompt": ["one", "two"]}, 400, "prompt", "one request per prompt"),
    ("/v1/completions", {"prompt": [5, 999_999]}, 400, "prompt", "999999"),
    ("/v1/completions", {"prompt": []}, 400, "prompt", "empty"),
    ("/v1/completions", {"prompt": [5] * 3000}, 400, "prompt", "context"),
    ("/v1/completions", {"prompt": "hi", "echo": True}, 400, "echo", ""),
    ("/v1/completions", {"prompt": "hi", "best_of": 3}, 400, "best_of", ""),
    ("/v1/completions", {"prompt": "hi", "model": "other"}, 404, "model", "other"),
]


def assert_openai_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"] and "Traceback" not in body["error"]["message"]
    return body["error"]


@pytest.mark.parametrize(("path", "body", "status", "param", "message"), BAD_REQUESTS)
def test_bad_request_gets_an_openai_error_naming_the_field(
    http, model, path, body, status, param, message
) -> None:
    body = {key: (model if value == "MODEL" else value) for key, value in body.items()}
    error = assert_openai_error(http.post(path, json=body), status)
    assert error["param"] == param, error
    assert message in error["message"], error


def test_malformed_json_is_a_400(http) -> None:
    response = http.post(
        "/v1/chat/completions", content=b'{"messages": [', headers={"content-type": "application/json"}
    )
    error = assert_openai_error(response, 400)
    assert "not valid JSON" in error["message"]


def test_a_body_that_is_not_an_object_is_a_400(http) -> None:
    error = assert_openai_error(http.post("/v1/chat/completions", json=[1, 2]), 400)
    assert "JSON object" in error["message"]


def test_unknown_model_is_404_with_openai_code(http) -> None:
    error = assert_openai_error(http.post("/v1/chat/completions", json=chat(model="nope")), 404)
    assert (error["code"], error["type"]) == ("model_not_found", "invalid_request_error")
    assert_openai_error(http.get("/v1/models/nope"), 404)


def test_unknown_path_and_wrong_method_are_openai_errors(http) -> None:
    assert_openai_error(http.get("/v1/nothing-here"), 404)
    assert_openai_error(http.get("/v1/chat/completions"), 405)


def test_api_key_is_required_on_v1_routes_when_set(cluster) -> None:
    with httpx.Client(base_url=cluster.keyed_url, timeout=30) as keyed:
        error = assert_openai_error(keyed.post("/v1/chat/completions", json=chat()), 401)
        assert error["code"] == "invalid_api_key"
        wrong = {"Authorization": "Bearer wrong"}
        assert_openai_error(keyed.post("/v1/chat/completions", json=chat(), headers=wrong), 401)
        assert_openai_error(keyed.get("/v1/models"), 401)
        right = {"Authorization": f"Bearer {API_KEY}"}
        assert keyed.post("/v1/chat/completions", json=chat(), headers=right).status_code == 200
        assert keyed.get("/v1/models", headers=right).status_code == 200
        assert keyed.get("/health").status_code == 200  # not under /v1


def test_the_openai_client_sends_the_api_key(cluster, model) -> None:
    from openai import AuthenticationError, OpenAI

    with OpenAI(base_url=f"{cluster.keyed_url}/v1", api_key=API_KEY, max_retries=0) as good:
        assert good.chat.completions.create(model=model, messages=USER, max_tokens=1).choices
    with OpenAI(base_url=f"{cluster.keyed_url}/v1", api_key="bad", max_retries=0) as bad:
        with pytest.raises(AuthenticationError):
            bad.chat.completions.create(model=model, messages=USER, max_tokens=1)


def test_the_server_keeps_serving_after_bad_requests(http, model, cluster) -> None:
    for path, body, *_ in BAD_REQUESTS:
        http.post(path, json=body)
    response = http.post("/v1/chat/completions", json=chat(model=model))
    assert response.status_code == 200
    assert wait_until(lambda: cluster.call(lambda: cluster.coordinator.live_sequences) == 0, timeout=2)
