"""One sequence as text deltas (`server/generation.py`), against a fake engine: which tokens become text,
where stop strings cut, and when the sequence is aborted."""

from __future__ import annotations

import asyncio

import pytest
from fake_engine import EOS, SPACE, FakeEngine, tokens

from meshllm.runtime.engine_client import GenerateRequest
from meshllm.server.errors import APIError
from meshllm.server.generation import Generation, SequenceRequest, TextDelta
from meshllm.step import PipelineError, PipelineUnavailable, SamplingParams

PROMPT = [1, 2, 3]


def sequence(stop: tuple[str, ...] = (), min_tokens: int = 0, max_tokens: int = 20) -> SequenceRequest:
    sampling = SamplingParams(min_tokens=min_tokens, eos_token_ids=(EOS,))
    return SequenceRequest(GenerateRequest(PROMPT, sampling, max_tokens), stop=stop)


def run(engine: FakeEngine, request: SequenceRequest) -> list[TextDelta]:
    async def main() -> list[TextDelta]:
        generation = Generation(engine, request)
        await generation.start()
        return [delta async for delta in generation.deltas()]

    return asyncio.run(main())


def text_of(deltas: list[TextDelta]) -> str:
    return "".join(delta.text for delta in deltas)


def test_the_deltas_spell_the_reply_and_the_last_carries_the_finish_reason() -> None:
    deltas = run(FakeEngine(tokens("hello world", "length")), sequence())
    assert text_of(deltas) == "hello world"
    assert [delta.finish_reason for delta in deltas[:-1]] == [None] * (len(deltas) - 1)
    assert deltas[-1].finish_reason == "length"
    assert deltas[-1].completion_tokens == len("hello world")


def test_a_token_that_ends_the_reply_with_stop_is_left_out_of_the_text() -> None:
    # The engine decided: an eos or a stop token. Either way it is not part of the reply.
    for last in (EOS, SPACE):
        deltas = run(FakeEngine(tokens("abc", "stop", last=last)), sequence())
        assert (text_of(deltas), deltas[-1].finish_reason, deltas[-1].completion_tokens) == ("abc", "stop", 4)


def test_a_token_that_ends_the_reply_by_length_is_part_of_the_text() -> None:
    deltas = run(FakeEngine(tokens("abc", "length", last=SPACE)), sequence())
    assert (text_of(deltas), deltas[-1].finish_reason) == ("abc ", "length")


def test_a_stop_string_cuts_the_reply_and_aborts_the_sequence() -> None:
    engine = FakeEngine(tokens("one two three", "length"))
    deltas = run(engine, sequence(stop=("two",)))
    assert (text_of(deltas), deltas[-1].finish_reason) == ("one ", "stop")
    assert deltas[-1].completion_tokens == len("one two")
    assert engine.aborted == [1]  # the engine had not finished it: every stage must free its cache


def test_stop_strings_are_not_looked_for_before_min_tokens() -> None:
    deltas = run(FakeEngine(tokens("ab ab ab", "length")), sequence(stop=("ab",), min_tokens=3))
    assert (text_of(deltas), deltas[-1].finish_reason) == ("ab ", "stop")


def test_a_sequence_the_engine_finished_is_not_aborted() -> None:
    engine = FakeEngine(tokens("abc", "stop", last=EOS))
    run(engine, sequence())
    assert engine.aborted == []


def test_closing_before_the_end_aborts_the_sequence() -> None:
    engine = FakeEngine(tokens("abcdef", "length"))

    async def main() -> None:
        generation = Generation(engine, sequence())
        await generation.start()
        deltas = generation.deltas()
        await anext(deltas)
        generation.close()
        generation.close()  # twice is harmless

    asyncio.run(main())
    assert engine.aborted == [1]


def test_an_unavailable_pipeline_is_a_503_and_a_request_that_cannot_fit_a_400() -> None:
    engine = FakeEngine()
    for refusal, status in (
        (PipelineUnavailable("device 'worker1' is unreachable"), 503),
        (ValueError("x"), 400),
    ):
        engine.refuse = refusal
        with pytest.raises(APIError) as caught:
            run(engine, sequence())
        assert caught.value.status == status


def test_a_failure_before_the_first_token_is_a_503_naming_the_device() -> None:
    engine = FakeEngine([], error=PipelineError("device 'worker1' (127.0.0.1:50051) is unreachable"))
    with pytest.raises(APIError) as caught:
        run(engine, sequence())
    assert caught.value.status == 503 and "worker1" in caught.value.message


def test_a_failure_after_the_first_token_raises_from_the_deltas() -> None:
    engine = FakeEngine(tokens("abc"), error=PipelineError("device 'worker1' is unreachable"))
    with pytest.raises(PipelineError, match="worker1"):
        run(engine, sequence())


def test_a_stream_that_ends_without_a_finish_reason_is_a_pipeline_error() -> None:
    with pytest.raises(PipelineError, match="cancelled"):
        run(FakeEngine(tokens("abc")), sequence())
