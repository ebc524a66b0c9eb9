"""Exponential backoff with a cap, for what is retried after a failure (a dead worker, a failed reload)."""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass
class Backoff:
    base: float = 1.0  # seconds before the first retry
    cap: float = 30.0  # never longer than this between two tries
    settle: float = 60.0  # a success that lasts this long forgets the earlier failures
    failures: int = 0
    _since: float = 0.0  # when the last success began

    def delay(self) -> float:
        """Seconds to wait before the next try, after one more failure."""
        if self._since and time.monotonic() - self._since >= self.settle:
            self.failures = 0
        self.failures += 1
        return min(self.cap, self.base * 2 ** (self.failures - 1))

    def succeeded(self) -> None:
        self._since = time.monotonic()
