"""Tensors on the wire: raw little-endian bytes, a shape and a dtype name. No pickle, ever.

Works for numpy arrays, torch tensors and mlx arrays. numpy has no bfloat16, so bfloat16 travels as its
raw 16-bit patterns and is viewed as bfloat16 again on the torch or mlx side.

Two ways each way: `to_bytes` / `from_bytes` always copy (the result owns its memory and shares nothing);
`to_buffer` / `from_buffer` avoid the copy where the memory allows it, for callers that move large arrays
and can keep to their rules (the communicator).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from meshllm.transport.proto import meshllm_pb2 as pb

WIRE_DTYPES = ("float32", "float16", "bfloat16", "int32", "int64")
FRAMEWORKS = ("numpy", "torch", "mlx")

# The numpy layout of each wire dtype: little-endian, bfloat16 as its uint16 bit patterns.
_NUMPY: dict[str, np.dtype] = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype("<u2"),
    "int32": np.dtype("<i4"),
    "int64": np.dtype("<i8"),
}


def framework_of(array: Any) -> str:
    module = type(array).__module__
    if module.startswith("torch"):
        return "torch"
    if module.startswith("mlx"):
        return "mlx"
    return "numpy"


def dtype_name(array: Any) -> str:
    """The wire name of `array`'s dtype ('float32', 'bfloat16', ...)."""
    dtype = array.dtype
    # numpy's name drops the byte order ('>i4' is int32); torch and mlx print 'torch.int32', 'mlx.core.int32'.
    name = dtype.name if isinstance(dtype, np.dtype) else str(dtype).rsplit(".", 1)[-1]
    if name not in WIRE_DTYPES:
        raise TypeError(f"dtype {array.dtype} cannot go on the wire (supported: {', '.join(WIRE_DTYPES)})")
    return name


def numpy_dtype(dtype: str) -> np.dtype:
    """The numpy layout of wire dtype `dtype` (little-endian; bfloat16 as uint16 bit patterns)."""
    try:
        return _NUMPY[dtype]
    except KeyError:
        raise ValueError(f"unknown wire dtype {dtype!r} (known: {', '.join(WIRE_DTYPES)})") from None


# ---- bfloat16: the top half of a float32 ----


def bfloat16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) as the float32 values they hold, exactly (a new array)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def float32_to_bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """Round float32 to the nearest bfloat16 (ties to even, as torch and mlx do); NaN stays NaN."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = ((bits + np.uint32(0x7FFF) + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(values)
    if nan.any():
        rounded[nan] = ((bits[nan] >> 16) | 0x0040).astype(np.uint16)  # keep sign and payload, force quiet
    return rounded


# ---- to the wire ----


def wire_array(array: Any) -> np.ndarray:
    """`array`'s values as a contiguous numpy array in their wire layout (`numpy_dtype`).

    A view of `array`'s memory where it already is that layout (a contiguous little-endian numpy array, a
    contiguous torch tensor on the CPU, an mlx array), else a copy.
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
    # Byte-swaps big-endian values; a copy only when the order or the layout has to change.
    return np.ascontiguousarray(host, dtype=host.dtype.newbyteorder("<"))


def to_buffer(array: Any) -> tuple[memoryview, list[int], str]:
    """Like `to_bytes`, but the bytes are a read-only view of `array`'s memory where `wire_array` can.

    Whoever holds the view must not keep it past the moment the caller may change or free `array`.
    """
    dtype = dtype_name(array)
    return wire_array(array).reshape(-1).data.cast("B").toreadonly(), list(array.shape), dtype


def to_bytes(array: Any) -> tuple[bytes, list[int], str]:
    """(raw little-endian bytes, shape, dtype name) of a numpy, torch or mlx array."""
    return wire_array(array).tobytes(), list(array.shape), dtype_name(array)


def encode(array: Any) -> pb.Tensor:
    data, shape, dtype = to_bytes(array)
    return pb.Tensor(data=data, shape=shape, dtype=dtype)


# ---- from the wire ----


def to_numpy(data: Any, shape: list[int] | tuple[int, ...], dtype: str) -> np.ndarray:
    """A numpy view of wire bytes (read-only for bytes); bfloat16 comes back as uint16 bit patterns."""
    return np.frombuffer(data, dtype=numpy_dtype(dtype)).reshape(shape)


def from_buffer(
    data: Any, shape: list[int] | tuple[int, ...], dtype: str, framework: str = "numpy", device: Any = None
) -> Any:
    """Like `from_bytes`, but without a copy when `data` is a writable buffer: the result then shares its
    memory, so the caller hands `data` over and must not use it again. Read-only data (bytes) is copied.

    device: for torch, where the tensor goes (None: stays on the CPU).
    """
    check_framework(framework)
    host = to_numpy(data, shape, dtype)
    if not host.flags.writeable:
        host = host.copy()
    return _in_framework(host, dtype, framework, device)


def from_bytes(data: bytes, shape: list[int], dtype: str, framework: str = "numpy") -> Any:
    """Rebuild an array in `framework` ('numpy', 'torch' or 'mlx') from wire bytes; it owns its memory.

    numpy has no bfloat16: asked for numpy, bfloat16 data comes back as float32 (exactly representable).
    """
    check_framework(framework)
    host = to_numpy(data, shape, dtype)
    # mlx copies what it is given, and numpy's bfloat16 becomes a new float32 array: no copy needed first.
    copies_anyway = framework == "mlx" or (framework == "numpy" and dtype == "bfloat16")
    return _in_framework(host if copies_anyway else host.copy(), dtype, framework)


def decode(message: pb.Tensor, framework: str = "numpy") -> Any:
    return from_bytes(message.data, list(message.shape), message.dtype, framework)


def check_framework(framework: str) -> None:
    if framework not in FRAMEWORKS:
        raise ValueError(f"unknown framework {framework!r}: use one of {', '.join(FRAMEWORKS)}")


def _in_framework(host: np.ndarray, dtype: str, framework: str, device: Any = None) -> Any:
    """`host` (wire layout, the caller's to give away) as an array of `framework`, sharing its memory
    where the framework can (numpy, torch; mlx always copies)."""
    if not host.dtype.isnative:  # a big-endian machine: the frameworks compute in native order
        host = host.astype(host.dtype.newbyteorder("="))
    bfloat16 = dtype == "bfloat16"
    if framework == "torch":
        import torch

        tensor = torch.from_numpy(host.view(np.int16) if bfloat16 else host)
        if bfloat16:
            tensor = tensor.view(torch.bfloat16)
        return tensor if device is None else tensor.to(device)
    if framework == "mlx":
        import mlx.core as mx

        array = mx.array(host)
        return array.view(mx.bfloat16) if bfloat16 else array
    return bfloat16_bits_to_float32(host) if bfloat16 else host
