"""Retries after failures wait twice as long each time, up to a cap; a lasting success forgets them."""

from __future__ import annotations

from meshllm.runtime.backoff import Backoff


def test_delays_double_up_to_the_cap() -> None:
    backoff = Backoff(base=1.0, cap=10.0)
    assert [backoff.delay() for _ in range(6)] == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]


def test_a_success_that_lasts_forgets_the_failures() -> None:
    backoff = Backoff(base=1.0, cap=10.0, settle=0.0)
    backoff.delay(), backoff.delay()
    backoff.succeeded()
    assert backoff.delay() == 1.0


def test_a_success_that_does_not_last_keeps_counting() -> None:
    backoff = Backoff(base=1.0, cap=10.0, settle=3600.0)
    backoff.delay()
    backoff.succeeded()
    assert backoff.delay() == 2.0
