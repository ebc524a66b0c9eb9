"""The KV caches of a torch stage: slots in pools, so the decode tokens of a step attend in one call.

A pool holds a few sequences whose caches fit `capacity` positions, per layer in one tensor of
`[slots, H_kv, capacity, D]` (the layout of gpt-fast's and vLLM's caches); a sequence has one slot, the
same in every layer. The decode tokens of a step's sequences in neighbouring slots of a pool then attend
in one `scaled_dot_product_attention` call, each row masked to its own length, instead of one call per
sequence; a prompt chunk attends on its own, over a view of its slot.

Capacities are powers of two from `MIN_CAPACITY`: a sequence that outgrows its pool moves to one of the
next capacity (its rows copied once, as a cache that doubles would copy them), so a slot holds at most
twice its sequence, and short sequences never pay for a long one's room. A pool has room for
`POOL_POSITIONS` positions in all (8 slots of 256, 4 of 512 … one slot from 2048 up) and never grows:
more sequences take more pools, so nothing held is ever copied to make room, and a pool is freed once it
holds no sequence (the last one of at most `POOL_POSITIONS` is kept for the next sequence: a new pool is
zeroed, which costs about as much as a 512-token prompt's attention).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from meshllm.step import Segment

MIN_CAPACITY = 256  # positions
POOL_POSITIONS = 2048  # a pool's slots times its capacity (at least one slot)


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
        slots: int,
        capacity: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ):
        self.layers, self.capacity = layers, capacity
        # zeros, not garbage: a batched attention reads the rows past a slot's length under its mask, and
        # a NaN there would still reach the output (0 * NaN)
        shape = (slots, kv_heads, capacity, head_dim)
        self.keys = {layer: torch.zeros(shape, dtype=dtype, device=device) for layer in layers}
        self.values = {layer: torch.zeros(shape, dtype=dtype, device=device) for layer in layers}
        self.device = device
        self.lengths = [0] * slots  # per slot: positions held (0 when free)
        self.free = list(range(slots - 1, -1, -1))  # the lowest slot last: taken first
        self.bytes = 2 * len(layers) * slots * capacity * kv_heads * head_dim * dtype.itemsize

    @property
    def slots(self) -> int:
        return len(self.lengths)

    @property
    def held(self) -> int:
        return self.slots - len(self.free)

    def take(self) -> int:
        return self.free.pop()

    def give_back(self, slot: int) -> None:
        self.lengths[slot] = 0
        self.free.append(slot)
        self.free.sort(reverse=True)  # the lowest first: the slots in use stay together at the front


class SequenceKV:
    """One sequence's place in the pools: a slot of a pool its length fits, moved up as it grows."""

    def __init__(self, pools: KVPools, length: int):
        """A slot with room for `length` positions."""
        self.pools = pools
        self.pool, self.slot = pools.take(capacity_for(length))

    @property
    def offset(self) -> int:
        """Positions held."""
        return self.pool.lengths[self.slot]

    def truncate(self, length: int) -> None:
        self.pool.lengths[self.slot] = min(self.offset, length)

    def reserve(self, length: int) -> None:
        """Room for `length` positions: to a pool of a bigger capacity if this one's is too small, the
        rows held moved."""
        if length <= self.pool.capacity:
            return
        held = self.offset
        pool, slot = self.pools.take(capacity_for(length))
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
        self.pools.give_back(self.pool, self.slot)


class KVPools:
    """A stage's pools by capacity, and at most one empty pool kept for the next sequence."""

    def __init__(self, layers: range, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        self.layers, self.kv_heads, self.head_dim = layers, kv_heads, head_dim
        self.dtype, self.device = dtype, device
        self.by_capacity: dict[int, list[KVPool]] = {}
        self.spare: KVPool | None = None
        self.positions = POOL_POSITIONS  # a new pool's slots times its capacity (at least one slot)

    def take(self, capacity: int) -> tuple[KVPool, int]:
        """A free slot of that capacity: in the first pool with one, else in a new pool."""
        pools = self.by_capacity.setdefault(capacity, [])
        for pool in pools:
            if pool.free:
                return pool, pool.take()
        if self.spare is not None and self.spare.capacity == capacity:
            pool, self.spare = self.spare, None
        else:
            slots = max(1, self.positions // capacity)
            args = (self.kv_heads, self.head_dim, self.dtype, self.device)
            pool = KVPool(self.layers, slots, capacity, *args)
        pools.append(pool)
        return pool, pool.take()

    def give_back(self, pool: KVPool, slot: int) -> None:
        pool.give_back(slot)
        if pool.held:
            return
        pools = self.by_capacity[pool.capacity]
        pools.remove(pool)
        if not pools:
            del self.by_capacity[pool.capacity]
        if pool.slots * pool.capacity <= self.positions:
            self.spare = pool  # the one before it is freed

    def bytes(self) -> int:
        """Held in pools, the spare one included."""
        held = sum(pool.bytes for pools in self.by_capacity.values() for pool in pools)
        return held + (self.spare.bytes if self.spare is not None else 0)


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
    half are the step's (pipelined micro-batches may hold alternate runs: each attends over its own);
    a run of two tokens or more is a batch, a lone token attends on its own."""
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
