"""One sequence's KV cache inside a ggml backend buffer, written and read by the step graphs themselves.

Per layer of the stage, a keys tensor and a values tensor of `[H_kv * D, capacity]` (ggml order: one row
of `H_kv * D` elements per position). A step's graph writes its new keys and values into the rows of
their positions (`ggml_set_rows`, the row indices are a graph input) and its attention reads views of the
first rows, so no key or value crosses into numpy. Capacity grows in chunks of `CHUNK` positions; growing
moves the cached rows into a new buffer, once per chunk at most. A step may restart a sequence from an
earlier position: it overwrites the rows from there, and its mask hides the rows after its last token.
"""

from __future__ import annotations

import ctypes
import itertools
from typing import Any

import numpy as np

from meshllm.errors import StageError

CHUNK = 256  # positions: the cache grows by whole chunks, and attention spans whole chunks (masked)

_generations = itertools.count(
    1
)  # every buffer a cache allocates gets a new number, so graphs tell them apart


def padded(length: int) -> int:
    """`length` positions rounded up to whole chunks."""
    return max(CHUNK, -(-length // CHUNK) * CHUNK)


class SequenceCache:
    """One sequence's keys and values for each layer of the stage, in one ggml backend buffer."""

    def __init__(self, g: Any, backend: Any, layers: int, row: int, kind: int):
        self.g, self.backend = g, backend
        self.layers, self.row, self.kind = layers, row, kind  # row: H_kv * D elements per position
        self.keys: list[Any] = []
        self.values: list[Any] = []
        self.offset = 0  # positions held
        self.capacity = 0
        self.generation = 0
        self._ctx: Any = None
        self._buffer: Any = None

    def reserve(self, length: int) -> None:
        """Room for `length` positions; the held ones move along when the buffer grows."""
        if length <= self.capacity:
            return
        g = self.g
        capacity = padded(max(length, 2 * self.capacity))
        ctx = g.ggml_init(
            g.ggml_init_params(
                mem_size=g.ggml_tensor_overhead() * (2 * self.layers + 2), mem_buffer=None, no_alloc=True
            )
        )
        keys = [g.ggml_new_tensor_2d(ctx, self.kind, self.row, capacity) for _ in range(self.layers)]
        values = [g.ggml_new_tensor_2d(ctx, self.kind, self.row, capacity) for _ in range(self.layers)]
        buffer = g.ggml_backend_alloc_ctx_tensors(ctx, self.backend)
        if not buffer:
            g.ggml_free(ctx)
            raise StageError(f"ggml: no memory for a KV cache of {capacity} positions")
        # zeros, not garbage, in the rows a padded attention span reads under its mask
        g.ggml_backend_buffer_clear(buffer, 0)
        if self.offset:
            held = np.empty(self.offset * g.ggml_row_size(self.kind, self.row), dtype=np.uint8)
            pointer = held.ctypes.data_as(ctypes.c_void_p)
            for old, new in zip(self.keys + self.values, keys + values, strict=True):
                g.ggml_backend_tensor_get(old, pointer, 0, held.nbytes)
                g.ggml_backend_tensor_set(new, pointer, 0, held.nbytes)
        self.free()
        self.keys, self.values, self.capacity = keys, values, capacity
        self._ctx, self._buffer = ctx, buffer
        self.generation = next(_generations)

    def free(self) -> None:
        if self._buffer is not None:
            self.g.ggml_backend_buffer_free(self._buffer)
            self.g.ggml_free(self._ctx)
        self._ctx = self._buffer = None
        self.keys, self.values, self.capacity = [], [], 0
