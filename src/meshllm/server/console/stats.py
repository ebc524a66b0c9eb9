"""What the console's charts plot: per-second sums over the last few minutes of tokens generated, times to
first token and each stage's step time, kept in memory (a few hundred small buckets)."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict

WINDOW_SECONDS = 300  # what the charts show: the last five minutes


@dataclass
class _Sum:
    total: float = 0.0
    count: int = 0

    def add(self, value: float) -> None:
        self.total += value
        self.count += 1

    def mean_ms(self) -> float | None:
        return round(1000 * self.total / self.count, 3) if self.count else None


@dataclass
class _Second:
    """Everything observed during one wall-clock second."""

    second: int
    tokens: int = 0
    first_token: _Sum = field(default_factory=_Sum)
    steps: dict[str, _Sum] = field(default_factory=dict)


class RecentSeries(BaseModel):
    """One value per second for `seconds` seconds ending at `end` (a Unix time, excluded); null where
    nothing was observed in that second."""

    model_config = ConfigDict(frozen=True)

    end: int
    seconds: int
    tokens_per_second: list[int]
    time_to_first_token_ms: list[float | None]  # the mean of the requests whose first token came then
    stage_step_ms: dict[str, list[float | None]]  # by stage name: the mean step time in that second


class RecentStats:
    """Thread-safe: the coordinator reports steps from its compute thread as well as the event loop."""

    def __init__(self, window: int = WINDOW_SECONDS, clock: Callable[[], float] = time.time) -> None:
        self.window = window
        self._clock = clock
        self._seconds: deque[_Second] = deque()
        self._lock = threading.Lock()

    def _now_bucket(self) -> _Second:
        """The bucket of this second (the lock is held); buckets older than the window are dropped."""
        second = int(self._clock())
        if not self._seconds or self._seconds[-1].second < second:
            self._seconds.append(_Second(second))
        while self._seconds[0].second <= second - self.window:
            self._seconds.popleft()
        return self._seconds[-1]

    def observe_tokens(self, n_tokens: int = 1) -> None:
        with self._lock:
            self._now_bucket().tokens += n_tokens

    def observe_first_token(self, seconds: float) -> None:
        with self._lock:
            self._now_bucket().first_token.add(seconds)

    def observe_step(self, stage_name: str, seconds: float) -> None:
        with self._lock:
            self._now_bucket().steps.setdefault(stage_name, _Sum()).add(seconds)

    def series(self) -> RecentSeries:
        """The last `window` whole seconds (the current second, still filling, is left out)."""
        with self._lock:
            end = int(self._clock())
            start = end - self.window
            by_second = {bucket.second: bucket for bucket in self._seconds if start <= bucket.second < end}
            buckets = [by_second.get(second, _Second(second)) for second in range(start, end)]
            stages = sorted({name for bucket in buckets for name in bucket.steps})
            return RecentSeries(
                end=end,
                seconds=self.window,
                tokens_per_second=[bucket.tokens for bucket in buckets],
                time_to_first_token_ms=[bucket.first_token.mean_ms() for bucket in buckets],
                stage_step_ms={
                    name: [
                        bucket.steps[name].mean_ms() if name in bucket.steps else None for bucket in buckets
                    ]
                    for name in stages
                },
            )
