"""Placement by cost: the split of the layers that makes the slowest stage as fast as it can be.

Decode reads every weight a stage holds once per token, so a stage's time per token is the bytes it
reads divided by its device's read speed. The embedding is a lookup (one row a token: nothing to speak
of); the lm_head is a full matmul every token, as heavy as ten layers of a small model. So the first stage
can take more layers than the last, and a slower device fewer than a faster one. Memory only bounds the
choice: each stage must fit its device (weights plus headroom for caches and activations).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from meshllm.step import LayerRange


@dataclass(frozen=True)
class ModelCosts:
    """Bytes of each part of the model as one device would hold it (its dtype and quantization)."""

    layers: list[int]  # each decoder layer's weights, all read every token
    embedding: int  # the first stage's lookup table (held, barely read)
    head: int  # the last stage's final norm and lm_head (held and read every token)
    head_is_embedding: bool = False  # tied and held as it is: a stage that is first and last holds it once

    def __post_init__(self) -> None:
        prefix = [0]
        for size in self.layers:
            prefix.append(prefix[-1] + size)
        object.__setattr__(self, "_prefix", prefix)  # sums of the first i layers

    def _layers(self, start: int, end: int) -> int:
        prefix: list[int] = self._prefix  # type: ignore[attr-defined]
        return prefix[end] - prefix[start]

    def held(self, start: int, end: int) -> int:
        total = self._layers(start, end)
        first, last = start == 0, end == len(self.layers)
        total += self.embedding * first + self.head * last
        if first and last and self.head_is_embedding:
            total -= self.embedding  # the table and the lm_head are one matrix
        return total

    def read(self, start: int, end: int) -> int:
        """Bytes read per decode token by a stage of layers `[start, end)`."""
        return self._layers(start, end) + self.head * (end == len(self.layers))


StageSeconds = Callable[[int, int, int], float]  # (device index, start, end) -> a stage's time, at speed 1


def balance(
    costs: list[ModelCosts],  # one per device, in chain order
    speeds: list[float],  # each device's read speed (bytes/s, or any common unit)
    memory: list[float],  # bytes each device may hold
    headroom: float,
    seconds: StageSeconds | None = None,  # a stage's time (None: its bytes read per decode token)
) -> list[LayerRange] | None:
    """Contiguous non-empty ranges, one per device in chain order, that minimise the slowest stage's time
    per token (or per step, by `seconds`; each over its device's speed) while each fits its device; None
    when no split fits."""
    n_devices, n_layers = len(costs), len(costs[0].layers)
    if n_layers < n_devices:
        return None
    # best[j][end]: the least slowest-stage time of the first j devices holding layers [0, end).
    best = [[math.inf] * (n_layers + 1) for _ in range(n_devices + 1)]
    choice = [[0] * (n_layers + 1) for _ in range(n_devices + 1)]
    best[0][0] = 0.0
    for j in range(1, n_devices + 1):
        device_costs, speed, room = costs[j - 1], speeds[j - 1], memory[j - 1]
        for end in range(j, n_layers - (n_devices - j) + 1):
            for start in range(j - 1, end):
                before = best[j - 1][start]
                if before == math.inf or device_costs.held(start, end) * headroom > room:
                    continue
                cost = device_costs.read(start, end) if seconds is None else seconds(j - 1, start, end)
                slowest = max(before, cost / speed)
                if slowest < best[j][end]:
                    best[j][end], choice[j][end] = slowest, start
    if best[n_devices][n_layers] == math.inf:
        return None
    ranges, end = [], n_layers
    for j in range(n_devices, 0, -1):
        start = choice[j][end]
        ranges.append(LayerRange(start, end))
        end = start
    return ranges[::-1]
