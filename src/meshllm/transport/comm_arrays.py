"""Arrays for the communicator: the caller's array to wire bytes and back, and the reduction arithmetic.

Collectives compute on flat numpy arrays in a *working* dtype: float32 for bfloat16 and float16 (so sums
do not lose precision at every hop), the array's own dtype otherwise. Results are narrowed back to the
input's dtype (round to nearest even) and handed back in the caller's framework.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

from meshllm.transport.comm_mailbox import Payload
from meshllm.transport.tensors import dtype_name, framework_of, to_bytes

REDUCE_OPS = ("sum", "max", "min", "mean")
FRAMEWORKS = ("numpy", "torch", "mlx")

# The numpy layout of each wire dtype (tensors.py): bfloat16 travels as its uint16 bit patterns.
_WIRE_NUMPY: dict[str, np.dtype] = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype("<u2"),
    "int32": np.dtype("<i4"),
    "int64": np.dtype("<i8"),
}
_BINARY = {"sum": np.add, "mean": np.add, "max": np.maximum, "min": np.minimum}


def wire_numpy_dtype(dtype: str) -> np.dtype:
    try:
        return _WIRE_NUMPY[dtype]
    except KeyError:
        raise ValueError(f"unknown wire dtype {dtype!r} (known: {', '.join(_WIRE_NUMPY)})") from None


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
        """The payload as an array of this kind, as tensors.from_bytes builds it (numpy gives float32 for
        bfloat16), but without a copy when the payload's data is writable: the result then owns it."""
        host = np.frombuffer(payload.data, dtype=wire_numpy_dtype(payload.dtype)).reshape(payload.shape)
        if not host.flags.writeable:
            host = host.copy()
        bfloat16 = payload.dtype == "bfloat16"
        if self.framework == "torch":
            import torch

            tensor = torch.from_numpy(host.view(np.int16) if bfloat16 else host)
            if bfloat16:
                tensor = tensor.view(torch.bfloat16)
            return tensor if self.device is None else tensor.to(self.device)
        if self.framework == "mlx":
            import mlx.core as mx

            array = mx.array(host)
            return array.view(mx.bfloat16) if bfloat16 else array
        if bfloat16:
            return (host.astype(np.uint32) << 16).view(np.float32)  # bfloat16 is the top half of a float32
        return host


def payload_of(array: Any) -> Payload:
    """A copy of `array`'s data as it goes on the wire (tensors.to_bytes)."""
    data, shape, dtype = to_bytes(array)
    return Payload(data, tuple(shape), dtype)


def view_payload(array: Any) -> Payload:
    """`array`'s data in its wire layout without a copy where possible (numpy, and torch on the CPU).

    The same bytes as `payload_of`, but a view of the caller's memory: whoever holds it must not keep it
    past the call that was given `array`, nor write to it.
    """
    dtype = dtype_name(array)
    framework = framework_of(array)
    if framework == "torch":
        import torch

        tensor = array.detach()
        if tensor.device.type != "cpu":
            tensor = tensor.cpu()
        tensor = tensor.contiguous()
        host = (tensor.view(torch.int16) if dtype == "bfloat16" else tensor).numpy()
    elif framework == "mlx":
        import mlx.core as mx

        host = np.array(array.view(mx.uint16) if dtype == "bfloat16" else array, copy=False)
    else:
        host = np.asarray(array)
    host = np.ascontiguousarray(host).reshape(-1)
    if sys.byteorder != "little":
        host = host.byteswap()
    return Payload(host.data.cast("B"), tuple(array.shape), dtype)


def snapshot(payload: Payload) -> Payload:
    """A payload that owns an immutable copy of its data."""
    return (
        payload
        if isinstance(payload.data, bytes)
        else Payload(bytes(payload.data), payload.shape, payload.dtype)
    )


def array_payload(values: np.ndarray, shape: tuple[int, ...], dtype: str) -> Payload:
    """A payload over `values` (already in `dtype`'s wire layout), without a copy."""
    return Payload(np.ascontiguousarray(values).data.cast("B"), shape, dtype)


def widen(payload: Payload, copy: bool = False) -> np.ndarray:
    """The payload's values as a flat array in the working dtype; with `copy`, always a new array."""
    host = np.frombuffer(payload.data, dtype=wire_numpy_dtype(payload.dtype))
    if payload.dtype == "bfloat16":
        return (host.astype(np.uint32) << 16).view(np.float32)  # bfloat16 is the top half of a float32
    if payload.dtype == "float16":
        return host.astype(np.float32)
    return host.copy() if copy else host


def narrow(values: np.ndarray, dtype: str) -> np.ndarray:
    """Working-dtype values in `dtype`'s wire layout (bfloat16 as uint16 bit patterns)."""
    if dtype == "bfloat16":
        return float32_to_bfloat16_bits(values)
    return values.astype(wire_numpy_dtype(dtype), copy=False)


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
