"""The console's series: per-second sums of tokens, first-token times and step times over a window."""

from __future__ import annotations

import threading

from meshllm.server.console.stats import RecentStats


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_tokens_are_summed_per_second_and_the_current_second_is_left_out() -> None:
    clock = Clock(1000.2)
    stats = RecentStats(window=5, clock=clock)
    stats.observe_tokens(3)
    clock.now = 1000.9
    stats.observe_tokens()
    clock.now = 1002.5
    stats.observe_tokens(7)  # the second still filling
    series = stats.series()
    assert series.end == 1002 and series.seconds == 5
    assert series.tokens_per_second == [0, 0, 0, 4, 0]  # seconds 997..1001
    clock.now = 1003.0
    assert stats.series().tokens_per_second == [0, 0, 4, 0, 7]


def test_first_token_and_step_times_are_means_in_milliseconds_with_null_where_nothing_came() -> None:
    clock = Clock(50.0)
    stats = RecentStats(window=3, clock=clock)
    stats.observe_first_token(0.010)
    stats.observe_first_token(0.030)
    stats.observe_step("worker1", 0.004)
    stats.observe_step("coordinator", 0.001)
    stats.observe_step("worker1", 0.002)
    clock.now = 52.0
    stats.observe_step("coordinator", 0.003)
    clock.now = 53.0
    series = stats.series()
    assert series.time_to_first_token_ms == [20.0, None, None]
    assert list(series.stage_step_ms) == ["coordinator", "worker1"]
    assert series.stage_step_ms["coordinator"] == [1.0, None, 3.0]
    assert series.stage_step_ms["worker1"] == [3.0, None, None]


def test_seconds_older_than_the_window_are_forgotten() -> None:
    clock = Clock(10.0)
    stats = RecentStats(window=4, clock=clock)
    for second in range(10, 30):
        clock.now = second
        stats.observe_tokens(second)
        stats.observe_step("worker1", 0.001)
    assert len(stats._seconds) == 4  # memory stays bounded by the window
    clock.now = 100.0
    series = stats.series()
    assert series.tokens_per_second == [0, 0, 0, 0]
    assert series.stage_step_ms == {}


def test_observations_from_several_threads_all_count() -> None:
    clock = Clock(7.0)
    stats = RecentStats(window=2, clock=clock)

    def observe() -> None:
        for _ in range(2000):
            stats.observe_tokens()
            stats.observe_step("coordinator", 0.001)

    threads = [threading.Thread(target=observe) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    clock.now = 8.0
    series = stats.series()
    assert series.tokens_per_second[-1] == 8000
    assert series.stage_step_ms["coordinator"][-1] == 1.0
