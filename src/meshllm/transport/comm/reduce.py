"""The reduction arithmetic of `all_reduce`, on flat numpy arrays.

Collectives compute in a *working* dtype: float32 for bfloat16 and float16 (so sums do not lose precision
at every hop), the array's own dtype otherwise. Results are narrowed back to the input's dtype (round to
nearest even) in its wire layout; tensors.py turns them into the caller's framework.
"""

from __future__ import annotations

import numpy as np

from meshllm.transport.comm.wire import Payload
from meshllm.transport.tensors import bfloat16_bits_to_float32, float32_to_bfloat16_bits, numpy_dtype

REDUCE_OPS = ("sum", "max", "min", "mean")

_BINARY = {"sum": np.add, "mean": np.add, "max": np.maximum, "min": np.minimum}


def widen(payload: Payload, copy: bool = False) -> np.ndarray:
    """The payload's values as a flat array in the working dtype; with `copy`, always a new array."""
    host = np.frombuffer(payload.data, dtype=numpy_dtype(payload.dtype))
    if payload.dtype == "bfloat16":
        return bfloat16_bits_to_float32(host)
    if payload.dtype == "float16":
        return host.astype(np.float32)
    return host.copy() if copy else host


def narrow(values: np.ndarray, dtype: str) -> np.ndarray:
    """Working-dtype values in `dtype`'s wire layout (bfloat16 as uint16 bit patterns)."""
    if dtype == "bfloat16":
        return float32_to_bfloat16_bits(values)
    return values.astype(numpy_dtype(dtype), copy=False)


def accumulate(total: np.ndarray, values: np.ndarray, op: str) -> None:
    """total = op(total, values), in place. "mean" adds here and divides in `finish`."""
    _BINARY[op](total, values, out=total)


def finish(total: np.ndarray, op: str, world_size: int) -> None:
    """Apply the last step of `op` in place: the division of "mean" (floor division for integers)."""
    if op != "mean":
        return
    if np.issubdtype(total.dtype, np.integer):
        np.floor_divide(total, world_size, out=total)
    else:
        np.divide(total, world_size, out=total)
