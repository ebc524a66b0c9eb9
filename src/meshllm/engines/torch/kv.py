"""The KV caches of a torch stage: slots in pools, so the decode tokens of a step attend in one call.

A pool holds the sequences whose caches fit `capacity` positions, per layer in one tensor of
`[slots, H_kv, capacity, D]` (the layout of gpt-fast's and vLLM's caches); a sequence has one slot, the
same in every layer. The decode tokens of all a step's sequences in one pool then attend in one
`scaled_dot_product_attention` call over the pool's first slots, each row masked to its own length,
instead of one call per sequence; a prompt chunk attends on its own, over a view of its slot.

Capacities are powers of two from `MIN_CAPACITY`: a sequence that outgrows its pool moves to the next
one up (its rows copied once, as a cache that doubles would copy them), so a slot holds at most twice
its sequence, and short sequences never pay for a long one's room. A pool grows by `SLOT_CHUNK` slots
at a time, reuses freed slots, and is dropped once it holds no sequence.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from meshllm.step import Segment

MIN_CAPACITY = 256  # positions
SLOT_CHUNK = 4  # slots a pool grows by


def capacity_for(length: int) -> int:
    capacity = MIN_CAPACITY
    while capacity < length:
        capacity *= 2
    return capacity


class KVPool:
    """The caches of up to `slots` sequences of at most `capacity` positions, for each layer of a stage."""

    def __init__(
        self,
        layers: range,
        capacity: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ):
        self.layers, self.capacity = layers, capacity
        self.shape = (kv_heads, capacity, head_dim)
        self.dtype, self.device = dtype, device
        self.keys = {layer: self._empty(0) for layer in layers}  # layer -> [slots, H_kv, capacity, D]
        self.values = {layer: self._empty(0) for layer in layers}
        self.lengths: list[int] = []  # per slot: positions held (0 when free)
        self.free: list[int] = []
        self.held = 0  # slots in use

    def _empty(self, slots: int) -> torch.Tensor:
        # zeros, not garbage: a batched attention reads the rows past a slot's length under its mask, and
        # a NaN there would still reach the output (0 * NaN)
        return torch.zeros(slots, *self.shape, dtype=self.dtype, device=self.device)

    @property
    def slots(self) -> int:
        return len(self.lengths)

    def take(self) -> int:
        """A free slot, the pool growing by `SLOT_CHUNK` slots when it has none."""
        if not self.free:
            old = self.slots
            grown = old + SLOT_CHUNK
            for tensors in (self.keys, self.values):
                for layer in self.layers:
                    bigger = self._empty(grown)
                    bigger[:old] = tensors[layer]
                    tensors[layer] = bigger
            self.lengths.extend([0] * SLOT_CHUNK)
            self.free = list(range(grown - 1, old - 1, -1))  # the lowest slot first
        slot = self.free.pop()
        self.held += 1
        return slot

    def give_back(self, slot: int) -> None:
        self.lengths[slot] = 0
        self.free.append(slot)
        self.free.sort(reverse=True)  # the lowest first: the slots in use stay at the front
        self.held -= 1

    def bytes(self) -> int:
        per_slot = 2 * len(self.layers) * self.shape[0] * self.shape[1] * self.shape[2] * self.dtype.itemsize
        return self.slots * per_slot


class SequenceKV:
    """One sequence's place in the pools: a slot of the pool its length fits, moved up as it grows."""

    def __init__(self, pools: KVPools):
        self.pools = pools
        self.pool = pools.pool(MIN_CAPACITY)
        self.slot = self.pool.take()

    @property
    def offset(self) -> int:
        """Positions held."""
        return self.pool.lengths[self.slot]

    def truncate(self, length: int) -> None:
        self.pool.lengths[self.slot] = min(self.offset, length)

    def reserve(self, length: int) -> None:
        """Room for `length` positions: to a bigger pool if this one is too small, the rows held moved."""
        if length <= self.pool.capacity:
            return
        held = self.offset
        pool = self.pools.pool(capacity_for(length))
        slot = pool.take()
        for layer in pool.layers:
            pool.keys[layer][slot, :, :held] = self.pool.keys[layer][self.slot, :, :held]
            pool.values[layer][slot, :, :held] = self.pool.values[layer][self.slot, :, :held]
        pool.lengths[slot] = held
        self.release()
        self.pool, self.slot = pool, slot

    def write(self, layer: int, keys: torch.Tensor, values: torch.Tensor, start: int) -> None:
        """`[H_kv, n, D]` keys and values at positions `start`…; `advance` then counts them held."""
        n = keys.shape[1]
        self.pool.keys[layer][self.slot, :, start : start + n] = keys
        self.pool.values[layer][self.slot, :, start : start + n] = values

    def advance(self, length: int) -> None:
        self.pool.lengths[self.slot] = length

    def view(self, layer: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `length` positions' keys and values, `[H_kv, length, D]` (views, no copy)."""
        return (
            self.pool.keys[layer][self.slot, :, :length],
            self.pool.values[layer][self.slot, :, :length],
        )

    def release(self) -> None:
        self.pool.give_back(self.slot)
        self.pools.drop_if_empty(self.pool)


class KVPools:
    """A stage's pools by capacity."""

    def __init__(self, layers: range, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        self.layers, self.kv_heads, self.head_dim = layers, kv_heads, head_dim
        self.dtype, self.device = dtype, device
        self.by_capacity: dict[int, KVPool] = {}

    def pool(self, capacity: int) -> KVPool:
        pool = self.by_capacity.get(capacity)
        if pool is None:
            pool = KVPool(self.layers, capacity, self.kv_heads, self.head_dim, self.dtype, self.device)
            self.by_capacity[capacity] = pool
        return pool

    def drop_if_empty(self, pool: KVPool) -> None:
        if pool.held == 0 and self.by_capacity.get(pool.capacity) is pool:
            del self.by_capacity[pool.capacity]

    def bytes(self) -> int:
        return sum(pool.bytes() for pool in self.by_capacity.values())


@dataclass
class DecodeBatch:
    """Decode tokens of a step whose sequences hold neighbouring slots of one pool, attended in one call
    per layer: the pool's slots `[first, first + count)` over their first `length` positions, each
    slot's row masked to its own (the rows of slots not in the step are computed and dropped)."""

    pool: KVPool
    first: int
    rows: torch.Tensor  # [b]: the tokens' rows in the step
    slots: torch.Tensor  # [b]: their sequences' slots
    local: torch.Tensor  # [b]: the same, counted from `first`
    positions: torch.Tensor  # [b]: where their keys and values go
    mask: torch.Tensor  # [count, 1, 1, length] bool: which keys each slot's query sees


@dataclass
class StepKV:
    """A step's caches: one per segment, and the decode batches that attend together."""

    caches: list[SequenceKV]
    batches: list[DecodeBatch]
    batched: set[int]  # indices of the segments attended in a batch


def step_kv(segments: list[Segment], caches: list[SequenceKV], window: int | None) -> StepKV:
    """The step's decode tokens grouped by pool, and within a pool into runs of slots of which at least
    half are the step's (pipelined micro-batches hold alternate runs of slots: each attends over its
    own); a run of two tokens or more is a batch, a lone token attends on its own."""
    by_pool: dict[int, list[int]] = {}
    for index, (segment, cache) in enumerate(zip(segments, caches, strict=True)):
        if segment.n_tokens == 1:
            by_pool.setdefault(id(cache.pool), []).append(index)
    starts = list(itertools.accumulate((s.n_tokens for s in segments), initial=0))  # each segment's first row
    batches, batched = [], set()
    for members in by_pool.values():
        members.sort(key=lambda i: caches[i].slot)
        runs: list[list[int]] = []
        for index in members:
            slot = caches[index].slot
            if runs and slot + 1 - caches[runs[-1][0]].slot <= 2 * (len(runs[-1]) + 1):
                runs[-1].append(index)
            else:
                runs.append([index])
        for run in runs:
            if len(run) > 1:
                batches.append(_batch(segments, caches, run, starts, window))
                batched.update(run)
    return StepKV(caches, batches, batched)


def _batch(
    segments: list[Segment], caches: list[SequenceKV], run: list[int], starts: list[int], window: int | None
) -> DecodeBatch:
    pool = caches[run[0]].pool
    slots = [caches[i].slot for i in run]
    first, count = slots[0], slots[-1] + 1 - slots[0]
    # a slot that is not in the step keeps its length (a free one sees its first row, zeros: no NaN)
    lengths = [max(1, length) for length in pool.lengths[first : first + count]]
    for i, slot in zip(run, slots, strict=True):
        lengths[slot - first] = segments[i].start_pos + 1
    keys = torch.arange(max(lengths))[None, :]
    ends = torch.tensor(lengths)[:, None]
    mask = keys < ends
    if window is not None:
        mask &= keys >= ends - window
    device = pool.device
    return DecodeBatch(
        pool,
        first,
        torch.tensor([starts[i] for i in run], device=device),
        torch.tensor(slots, device=device),
        torch.tensor([slot - first for slot in slots], device=device),
        torch.tensor([segments[i].start_pos for i in run], device=device),
        mask[:, None, None, :].to(device),
    )
