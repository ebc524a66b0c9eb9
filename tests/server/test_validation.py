"""The checks of a request and the sequence request they build (`server/validation.py`): pure, no engine."""

from __future__ import annotations

from typing import Any

import pytest
from fake_engine import EOS, MODEL

from meshllm.server.errors import APIError
from meshllm.server.protocol import ChatCompletionRequest, CompletionRequest
from meshllm.server.validation import (
    ChatPrompt,
    StreamShape,
    ValidRequest,
    validate_chat,
    validate_completion,
)

USER = [{"role": "user", "content": "hi"}]


def chat(**fields: Any) -> ValidRequest:
    return validate_chat(ChatCompletionRequest.model_validate({"messages": USER, **fields}), "fake", MODEL)


def completion(**fields: Any) -> ValidRequest:
    return validate_completion(CompletionRequest.model_validate({"prompt": "hi", **fields}), "fake", MODEL)


def refusal(build: Any, **fields: Any) -> APIError:
    with pytest.raises(APIError) as caught:
        build(**fields)
    return caught.value


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"n": 2}, "n"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"frequency_penalty": -1.0}, "frequency_penalty"),
        ({"logit_bias": {"5": 1.0}}, "logit_bias"),
        ({"logprobs": True}, "logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"tools": [{"type": "function"}]}, "tools"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"function_call": {"name": "f"}}, "function_call"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"audio": {"voice": "x"}}, "audio"),
        ({"prediction": {"type": "content"}}, "prediction"),
        ({"web_search_options": {}}, "web_search_options"),
    ],
)
def test_chat_features_this_server_does_not_do_are_refused_naming_the_field(fields, param) -> None:
    error = refusal(chat, **fields)
    assert (error.status, error.param, error.code) == (400, param, "unsupported_parameter")


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"echo": True}, "echo"),
        ({"best_of": 2}, "best_of"),
        ({"suffix": "x"}, "suffix"),
        ({"logprobs": 1}, "logprobs"),
    ],
)
def test_completion_features_this_server_does_not_do_are_refused(fields, param) -> None:
    assert refusal(completion, **fields).param == param


def test_neutral_values_of_refused_features_are_accepted() -> None:
    chat(
        n=1, presence_penalty=0, frequency_penalty=0, logit_bias={}, logprobs=False, top_logprobs=0, tools=[]
    )
    chat(tool_choice="none", response_format={"type": "text"}, modalities=["text"])
    completion(echo=False, best_of=1, suffix="")


def test_another_model_is_a_404_and_none_means_the_served_one() -> None:
    error = refusal(chat, model="gpt-4o")
    assert (error.status, error.param, error.code) == (404, "model", "model_not_found")
    assert chat(model="fake") and chat()


def test_stream_options_need_stream() -> None:
    assert refusal(chat, stream_options={"include_usage": True}).param == "stream_options"


def test_messages_are_rendered_as_the_template_expects_them() -> None:
    messages = [
        {"role": "developer", "content": "be brief", "name": "boss"},
        {"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]},
        {"role": "assistant", "content": None, "reasoning_content": "hmm", "extra": "ignored"},
    ]
    prompt = chat(messages=messages, chat_template_kwargs={"enable_thinking": False}).prompt
    assert prompt == ChatPrompt(
        [
            {"role": "system", "content": "be brief", "name": "boss"},
            {"role": "user", "content": "one\ntwo"},
            {"role": "assistant", "content": "", "reasoning_content": "hmm"},
        ],
        {"enable_thinking": False},
    )


@pytest.mark.parametrize(
    ("messages", "param"),
    [
        ([], "messages"),
        ([{"role": "user"}], "messages[0].content"),
        ([{"role": "tool", "content": "x"}], "messages[0].role"),
        ([{"role": "assistant", "content": "x", "tool_calls": [{"id": "1"}]}], "messages[0].tool_calls"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "messages[0].content[0]"),
    ],
)
def test_messages_the_template_cannot_take_are_refused_naming_the_message(messages, param) -> None:
    assert refusal(chat, messages=messages).param == param


def test_chat_template_kwargs_may_not_set_what_the_template_call_sets() -> None:
    error = refusal(chat, chat_template_kwargs={"tokenize": True, "messages": []})
    assert error.param == "chat_template_kwargs" and "messages, tokenize" in error.message


def test_empty_stop_strings_are_refused() -> None:
    assert refusal(chat, stop="").param == "stop"
    assert refusal(chat, stop=["ok", ""]).param == "stop"
    assert chat(stop="end").stop == ("end",) and chat(stop=["a", "b"]).stop == ("a", "b")


def test_token_ids_outside_the_vocabulary_are_refused() -> None:
    error = refusal(chat, stop_token_ids=[3, MODEL.vocab_size])
    assert error.param == "stop_token_ids" and str(MODEL.vocab_size) in error.message
    assert refusal(completion, prompt=[1, -1]).param == "prompt"


def test_a_completion_prompt_is_one_text_or_one_list_of_token_ids() -> None:
    assert completion(prompt="hello").prompt == "hello"
    assert completion(prompt=["hello"]).prompt == "hello"
    assert completion(prompt=[4, 5]).prompt == [4, 5]
    assert completion(prompt=[[4, 5]]).prompt == [4, 5]
    assert "one request per prompt" in refusal(completion, prompt=["a", "b"]).message
    assert refusal(completion, prompt=[[1], [2]]).param == "prompt"
    assert "empty" in refusal(completion, prompt=[]).message


def test_the_sequence_carries_sampling_stop_tokens_and_the_text_options() -> None:
    valid = chat(
        temperature=0.5,
        top_p=0.9,
        top_k=-1,
        seed=-1,
        min_tokens=2,
        ignore_eos=True,
        stop_token_ids=[7, 8],
        stop=["end"],
        skip_special_tokens=False,
        max_tokens=5,
    )
    request = valid.sequence([1, 2, 3], MODEL)
    generate = request.generate
    assert (generate.prompt_ids, generate.max_tokens, generate.ignore_eos) == ([1, 2, 3], 5, True)
    assert generate.stop_token_ids == frozenset({7, 8})
    sampling = generate.sampling
    assert (sampling.temperature, sampling.top_p, sampling.top_k) == (0.5, 0.9, 0)
    assert (sampling.seed, sampling.min_tokens) == (2**64 - 1, 2)
    assert sampling.eos_token_ids == (EOS, 7, 8)  # stop tokens are banned with eos until min_tokens
    assert (request.stop, request.skip_special_tokens, request.min_tokens) == (("end",), False, 2)


def test_a_top_k_beyond_the_vocabulary_cuts_nothing_and_fits_the_wire() -> None:
    sampling = completion(top_k=99_999_999_999_999).sequence([1], MODEL).generate.sampling
    assert sampling.top_k == MODEL.vocab_size  # the stages carry top_k as a 32-bit integer


def test_sampling_defaults_are_openai_s() -> None:
    sampling = completion().sequence([1], MODEL).generate.sampling
    assert (sampling.temperature, sampling.top_p, sampling.top_k, sampling.seed) == (1.0, 1.0, 0, None)


def test_max_completion_tokens_wins_over_max_tokens() -> None:
    assert chat(max_tokens=3, max_completion_tokens=4).sequence([1], MODEL).generate.max_tokens == 4
    error = refusal(lambda: chat(max_tokens=3, max_completion_tokens=100).sequence([1], MODEL))
    assert error.param == "max_completion_tokens"


def test_without_max_tokens_chat_gets_the_context_left_and_completions_16() -> None:
    prompt = [1] * 10
    assert chat().sequence(prompt, MODEL).generate.max_tokens == MODEL.max_context - 10
    assert completion().sequence(prompt, MODEL).generate.max_tokens == 16
    assert completion().sequence([1] * 60, MODEL).generate.max_tokens == 4


def test_a_prompt_that_fills_the_context_is_blamed_on_the_prompt_field() -> None:
    for valid, field in ((chat(), "messages"), (completion(), "prompt")):
        error = refusal(lambda valid=valid: valid.sequence([1] * MODEL.max_context, MODEL))
        assert (error.param, error.code) == (field, "context_length_exceeded")
        assert f"{MODEL.max_context} tokens are in the {field}" in error.message


def test_too_many_requested_tokens_name_the_field_and_the_room_left() -> None:
    error = refusal(lambda: chat(max_tokens=60).sequence([1] * 10, MODEL))
    assert (error.param, error.code) == ("max_tokens", "context_length_exceeded")
    assert "at most 54" in error.message


def test_min_tokens_over_max_tokens_is_refused() -> None:
    error = refusal(lambda: chat(min_tokens=5, max_tokens=2).sequence([1], MODEL))
    assert error.param == "min_tokens" and "max_tokens (2)" in error.message


def test_a_text_prompt_that_tokenizes_to_nothing_is_refused() -> None:
    error = refusal(lambda: completion(prompt="").sequence([], MODEL))
    assert (error.param, error.message) == ("prompt", "prompt must not be empty")


def test_the_stream_shape_follows_stream_and_its_options() -> None:
    assert chat().stream is None
    assert chat(stream=True).stream == StreamShape()
    options = {"include_usage": True, "continuous_usage_stats": True}
    assert completion(stream=True, stream_options=options).stream == StreamShape(True, True)
