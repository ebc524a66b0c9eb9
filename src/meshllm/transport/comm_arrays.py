"""Arrays for the communicator: the caller's array to wire bytes and back, and the reduction arithmetic.

Collectives compute on flat numpy arrays in a *working* dtype: float32 for bfloat16 and float16 (so sums
do not lose precision at every hop), the array's own dtype otherwise. Results are narrowed back to the
input's dtype (round to nearest even) and handed back in the caller's framework.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from meshllm.transport.comm_mailbox import Payload
from meshllm.transport.tensors import framework_of, from_bytes, to_bytes, to_numpy

REDUCE_OPS = ("sum", "max", "min", "mean")
FRAMEWORKS = ("numpy", "torch", "mlx")

_WIRE_NUMPY = {"float32": np.float32, "float16": np.float16, "int32": np.int32, "int64": np.int64}
_BINARY = {"sum": np.add, "mean": np.add, "max": np.maximum, "min": np.minimum}


@dataclass(frozen=True)
class ArrayKind:
    """How to hand an array back: in which framework, and for torch on which device (None: the CPU)."""

    framework: str
    device: Any = None

    @classmethod
    def of(cls, array: Any) -> ArrayKind:
        framework = framework_of(array)
        device = array.device if framework == "torch" and array.device.type != "cpu" else None
        return cls(framework, device)

    @classmethod
    def resolve(cls, like: Any, default: str) -> ArrayKind:
        """`like` is None (the communicator's default framework), a framework name, or an array to match."""
        if like is None:
            like = default
        if isinstance(like, str):
            if like not in FRAMEWORKS:
                raise ValueError(f"unknown framework {like!r}: use one of {', '.join(FRAMEWORKS)}")
            return cls(like)
        return cls.of(like)

    def build(self, payload: Payload) -> Any:
        """The payload as an array of this kind (numpy gives float32 for bfloat16, see tensors.py)."""
        array = from_bytes(payload.data, list(payload.shape), payload.dtype, self.framework)
        return array if self.device is None else array.to(self.device)


def payload_of(array: Any) -> Payload:
    data, shape, dtype = to_bytes(array)
    return Payload(data, tuple(shape), dtype)


def widen(payload: Payload) -> np.ndarray:
    """The payload's values as a flat array in the working dtype (read-only when no conversion was needed)."""
    host = to_numpy(payload.data, list(payload.shape), payload.dtype).reshape(-1)
    if payload.dtype == "bfloat16":
        return (host.astype(np.uint32) << 16).view(np.float32)  # bfloat16 is the top half of a float32
    if payload.dtype == "float16":
        return host.astype(np.float32)
    return host


def narrow(values: np.ndarray, dtype: str) -> np.ndarray:
    """Working-dtype values in `dtype`'s wire layout (bfloat16 as uint16 bit patterns)."""
    if dtype == "bfloat16":
        return float32_to_bfloat16_bits(values)
    return values.astype(_WIRE_NUMPY[dtype], copy=False)


def float32_to_bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """Round float32 to the nearest bfloat16 (ties to even, as torch and mlx do); NaN stays NaN."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = ((bits + np.uint32(0x7FFF) + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(values)
    if nan.any():
        rounded[nan] = ((bits[nan] >> 16) | 0x0040).astype(np.uint16)  # keep sign and payload, force quiet
    return rounded


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


def wire_payload(values: np.ndarray, shape: tuple[int, ...], dtype: str) -> Payload:
    """A payload from values already in `dtype`'s wire layout."""
    return Payload(np.ascontiguousarray(values).tobytes(), shape, dtype)
