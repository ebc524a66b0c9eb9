"""The scheduler's policy, driven by hand: no processes, no sockets, no event loop."""

from __future__ import annotations

import pytest

from meshllm.runtime.engine_client import GenerateRequest
from meshllm.runtime.scheduler import KVBudget, Scheduler, SequenceStatus
from meshllm.step import PipelineError, SampledToken, SamplingParams

EOS = 2


def request(prompt_len: int = 4, max_tokens: int = 8, **options) -> GenerateRequest:
    sampling = SamplingParams(seed=1, eos_token_ids=(EOS,), min_tokens=options.pop("min_tokens", 0))
    return GenerateRequest(list(range(10, 10 + prompt_len)), sampling, max_tokens, **options)


def sampled(step, token_id: int = 7) -> list[SampledToken]:
    """What the last stage would return for `step`: a token for every segment marked sample."""
    return [SampledToken(s.seq_id, token_id, -0.5) for s in step.input.segments if s.sample]


def drain(scheduler: Scheduler) -> list:
    steps = []
    while (step := scheduler.schedule()) is not None:
        steps.append(step)
    return steps


def test_at_most_one_step_per_stage_is_in_flight() -> None:
    scheduler = Scheduler(max_in_flight=2)
    for _ in range(6):
        scheduler.add(request())
    assert len(drain(scheduler)) == 2
    assert scheduler.in_flight == 2 and scheduler.schedule() is None


def test_a_sequence_is_in_at_most_one_step_in_flight() -> None:
    scheduler = Scheduler(max_in_flight=4)
    seq_id = scheduler.add(request())
    steps = drain(scheduler)
    assert [step.seq_ids for step in steps] == [[seq_id]]  # the other three stages wait for it
    scheduler.update(steps[0].step_id, sampled(steps[0]))
    (step,) = drain(scheduler)
    assert step.seq_ids == [seq_id]


def test_decode_tokens_come_before_prompt_chunks() -> None:
    scheduler = Scheduler(max_in_flight=1)
    first = scheduler.add(request())
    (step,) = drain(scheduler)
    scheduler.update(step.step_id, sampled(step))  # first is decoding now
    second = scheduler.add(request())
    (step,) = drain(scheduler)
    assert step.seq_ids == [first, second]
    assert [(s.n_tokens, s.sample) for s in step.input.segments] == [(1, True), (4, True)]


def test_live_sequences_are_split_into_one_micro_batch_per_stage() -> None:
    scheduler = Scheduler(max_in_flight=3)
    for _ in range(7):
        scheduler.add(request())
    assert [len(step.seq_ids) for step in drain(scheduler)] == [3, 3, 1]  # ceil(7 / 3) a step


def test_sequences_beyond_the_running_cap_wait_unstarted_and_start_when_one_finishes() -> None:
    scheduler = Scheduler(max_in_flight=1, max_running=2)
    ids = [scheduler.add(request(max_tokens=1)) for _ in range(3)]
    (step,) = drain(scheduler)
    assert step.seq_ids == ids[:2]
    assert scheduler.status(ids[2]) == SequenceStatus.WAITING
    update = scheduler.update(step.step_id, sampled(step))
    assert sorted(update.release) == sorted(ids[:2])  # both reached max_tokens
    (step,) = drain(scheduler)
    assert step.seq_ids == [ids[2]]


def test_a_long_prompt_is_prefilled_in_chunks_within_the_token_budget() -> None:
    scheduler = Scheduler(max_in_flight=1, max_step_tokens=512)
    seq_id = scheduler.add(request(prompt_len=1300))
    chunks = []
    while (step := scheduler.schedule()) is not None:
        (segment,) = step.input.segments
        chunks.append((segment.start_pos, segment.n_tokens, segment.sample))
        assert list(step.input.token_ids) == list(
            range(10 + segment.start_pos, 10 + segment.start_pos + segment.n_tokens)
        )
        update = scheduler.update(step.step_id, sampled(step))
        if segment.sample:
            assert [event.token.token_id for event in update.events] == [7]
            break
        assert not update.events
    assert chunks == [(0, 512, False), (512, 512, False), (1024, 276, True)]
    assert scheduler.status(seq_id) == SequenceStatus.RUNNING


def test_a_step_feeds_each_sequence_its_last_sampled_token_at_the_next_position() -> None:
    scheduler = Scheduler(max_in_flight=1)
    scheduler.add(request(prompt_len=3))
    (step,) = drain(scheduler)
    scheduler.update(step.step_id, sampled(step, token_id=55))
    (step,) = drain(scheduler)
    (segment,) = step.input.segments
    assert (segment.start_pos, segment.n_tokens, list(step.input.token_ids)) == (3, 1, [55])


def test_aborting_a_sequence_in_flight_ends_it_when_its_step_returns() -> None:
    scheduler = Scheduler(max_in_flight=1)
    seq_id = scheduler.add(request())
    (step,) = drain(scheduler)
    update = scheduler.abort(seq_id)
    assert not update.events and not update.release  # the stages are still computing it
    assert scheduler.status(seq_id) == SequenceStatus.ABORTING
    update = scheduler.update(step.step_id, sampled(step))
    assert [(event.seq_id, event.token, event.done) for event in update.events] == [(seq_id, None, True)]
    assert update.release == [seq_id]
    assert scheduler.live_sequences == 0 and scheduler.schedule() is None


def test_aborting_a_waiting_sequence_ends_it_at_once_with_nothing_to_release() -> None:
    scheduler = Scheduler(max_in_flight=1)
    seq_id = scheduler.add(request())
    update = scheduler.abort(seq_id)
    assert [event.done for event in update.events] == [True] and update.release == []
    assert scheduler.abort(seq_id).events == []  # twice is harmless


def test_a_failed_step_ends_its_sequences_with_the_error_and_releases_them() -> None:
    scheduler = Scheduler(max_in_flight=2)
    ids = [scheduler.add(request()) for _ in range(2)]
    first, second = drain(scheduler)
    error = PipelineError("device 'w1' is unreachable")
    update = scheduler.fail(first.step_id, error)
    assert [(event.seq_id, event.error) for event in update.events] == [(ids[0], error)]
    assert update.release == [ids[0]]
    assert scheduler.status(ids[1]) == SequenceStatus.IN_FLIGHT


def test_a_hold_stalls_the_started_sequences_and_resume_prefills_each_again_from_its_first_token() -> None:
    scheduler = Scheduler(max_in_flight=2)
    ids = [scheduler.add(request(prompt_len=3)) for _ in range(2)]
    first, second = drain(scheduler)
    scheduler.update(first.step_id, sampled(first, token_id=55))  # ids[0] has a token and a cache
    scheduler.hold(PipelineError("the layers are being planned again"), now=10.0)
    assert scheduler.paused and scheduler.schedule() is None
    assert scheduler.status(ids[0]) == SequenceStatus.STALLED
    assert scheduler.status(ids[1]) == SequenceStatus.IN_FLIGHT  # still out: its outcome is awaited
    scheduler.update(second.step_id, sampled(second, token_id=66))
    scheduler.resume()
    steps = drain(scheduler)
    segments = {segment.seq_id: segment for step in steps for segment in step.input.segments}
    tokens = {step.input.segments[0].seq_id: list(step.input.token_ids) for step in steps}
    # Each is prefilled again from position 0 (prompt and its token so far), its sampler told where it is.
    assert [(segments[i].start_pos, segments[i].n_tokens, segments[i].sampled) for i in ids] == [
        (0, 4, 1)
    ] * 2
    assert tokens[ids[0]] == [10, 11, 12, 55] and tokens[ids[1]] == [10, 11, 12, 66]


def test_a_held_sequence_that_waits_past_the_timeout_ends_with_the_reason() -> None:
    scheduler = Scheduler(max_in_flight=1)
    seq_id = scheduler.add(request())
    (step,) = drain(scheduler)
    scheduler.update(step.step_id, sampled(step))
    scheduler.hold(PipelineError("the layers are being planned again"), now=10.0)
    assert scheduler.expire(now=12.0, timeout=5.0).events == []
    (event,) = scheduler.expire(now=15.0, timeout=5.0).events
    assert event.seq_id == seq_id and "planned again" in str(event.error)


@pytest.mark.parametrize(
    ("options", "tokens", "expected"),
    [
        ({}, [7, EOS], ["", "stop"]),
        ({"ignore_eos": True, "max_tokens": 3}, [7, EOS, 7], ["", "", "length"]),
        ({"stop_token_ids": frozenset({9})}, [7, 9], ["", "stop"]),
        ({"stop_token_ids": frozenset({9}), "min_tokens": 2}, [9, 9, 9], ["", "", "stop"]),
        ({"max_tokens": 2}, [7, 7], ["", "length"]),
    ],
    ids=["eos", "ignore_eos", "stop token", "stop token after min_tokens", "max_tokens"],
)
def test_stop_conditions_are_decided_for_every_sampled_token(options, tokens, expected) -> None:
    scheduler = Scheduler(max_in_flight=1)
    scheduler.add(request(**options))
    reasons = []
    for token_id in tokens:
        (step,) = drain(scheduler)
        (event,) = scheduler.update(step.step_id, sampled(step, token_id)).events
        reasons.append(event.token.finish_reason or "")
    assert reasons == expected
    assert scheduler.live_sequences == 0


def test_a_sequence_without_a_seed_gets_one_so_every_stage_samples_alike() -> None:
    scheduler = Scheduler(max_in_flight=1)
    scheduler.add(GenerateRequest([5, 6], SamplingParams(temperature=1.0), 4))
    (step,) = drain(scheduler)
    assert step.input.segments[0].sampling.seed is not None


def test_bad_requests_are_refused() -> None:
    scheduler = Scheduler(max_in_flight=1)
    with pytest.raises(ValueError, match="no tokens"):
        scheduler.add(GenerateRequest([], SamplingParams(), 4))
    with pytest.raises(ValueError, match="max_tokens"):
        scheduler.add(GenerateRequest([1], SamplingParams(), 0))


# ---- KV admission by bytes ----

# Two stages: the second holds fewer tokens (30 of 100 bytes each in 3000 bytes against 40 in 2000).
BUDGETS = [KVBudget("coordinator", 50, 2000), KVBudget("w1", 100, 3000)]


def test_sequences_start_only_while_their_projected_caches_fit_on_every_stage() -> None:
    scheduler = Scheduler(max_in_flight=1, kv_budgets=BUDGETS)
    assert scheduler.kv_tokens == 30
    first, second, third = (scheduler.add(request(4, 8)) for _ in range(3))  # 12 tokens each
    (step,) = drain(scheduler)
    assert step.seq_ids == [first, second] and scheduler.kv_reserved == 24
    assert scheduler.status(third) == SequenceStatus.WAITING and scheduler.waiting == 1
    update = scheduler.update(step.step_id, sampled(step, EOS))  # both end: their caches are released
    assert sorted(update.release) == sorted([first, second])
    (step,) = drain(scheduler)
    assert step.seq_ids == [third] and scheduler.waiting == 0


def test_later_small_arrivals_wait_behind_an_earlier_one_that_does_not_fit_yet() -> None:
    scheduler = Scheduler(max_in_flight=1, kv_budgets=BUDGETS)
    running = scheduler.add(request(4, 16))  # 20 of 30 tokens
    large = scheduler.add(request(4, 12))  # 16: does not fit next to it
    small = scheduler.add(request(1, 2))  # 3 would fit, but arrived later
    (step,) = drain(scheduler)
    assert step.seq_ids == [running]
    assert scheduler.status(large) == scheduler.status(small) == SequenceStatus.WAITING


def test_a_sequence_that_cannot_fit_alone_is_refused_naming_the_stage_and_its_limit() -> None:
    scheduler = Scheduler(max_in_flight=1, kv_budgets=BUDGETS)
    with pytest.raises(ValueError, match=r"needs 0\.0 MB of KV cache on device 'w1', .*\(30 tokens\)"):
        scheduler.add(request(10, 21))
    assert scheduler.live_sequences == 0


def test_a_stage_that_reports_no_kv_figures_limits_nothing() -> None:
    scheduler = Scheduler(max_in_flight=1, kv_budgets=[KVBudget("old-worker", 0, 0)])
    assert scheduler.kv_tokens is None
    for _ in range(4):
        scheduler.add(request(100, 1000))
    (step,) = drain(scheduler)
    assert len(step.seq_ids) == 4
