"""Tensors on the wire: raw little-endian bytes, a shape and a dtype name. No pickle, ever.

Works for numpy arrays, torch tensors and mlx arrays. numpy has no bfloat16, so bfloat16 travels as its
raw 16-bit patterns and is viewed as bfloat16 again on the torch or mlx side.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from meshllm.transport.proto import meshllm_pb2 as pb

WIRE_DTYPES = ("float32", "float16", "bfloat16", "int32", "int64")
_NUMPY = {"float32": "<f4", "float16": "<f2", "bfloat16": "<u2", "int32": "<i4", "int64": "<i8"}


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


def to_bytes(array: Any) -> tuple[bytes, list[int], str]:
    """(raw little-endian bytes, shape, dtype name) of a numpy, torch or mlx array."""
    dtype = dtype_name(array)
    framework = framework_of(array)
    if framework == "torch":
        import torch

        tensor = array.detach()
        if tensor.device.type != "cpu":
            tensor = tensor.cpu()
        tensor = tensor.contiguous()
        if dtype == "bfloat16":
            tensor = tensor.view(torch.int16)
        host = tensor.numpy()
    elif framework == "mlx":
        import mlx.core as mx

        host = np.array(array.view(mx.uint16) if dtype == "bfloat16" else array, copy=False)
    else:
        host = np.asarray(array)
    host = np.ascontiguousarray(host, dtype=host.dtype.newbyteorder("<"))  # converts big-endian values
    return host.tobytes(), list(array.shape), dtype


def to_numpy(data: bytes, shape: list[int], dtype: str) -> np.ndarray:
    """A read-only numpy view of wire bytes; bfloat16 comes back as uint16 bit patterns."""
    if dtype not in _NUMPY:
        raise ValueError(f"unknown wire dtype {dtype!r}")
    return np.frombuffer(data, dtype=_NUMPY[dtype]).reshape(shape)


def from_bytes(data: bytes, shape: list[int], dtype: str, framework: str = "numpy") -> Any:
    """Rebuild an array in `framework` ('numpy', 'torch' or 'mlx') from wire bytes.

    numpy has no bfloat16: asked for numpy, bfloat16 data comes back as float32 (exactly representable).
    """
    host = to_numpy(data, shape, dtype)
    if framework == "torch":
        import torch

        if dtype == "bfloat16":
            return torch.from_numpy(host.astype(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(host.copy())
    if framework == "mlx":
        import mlx.core as mx

        if dtype == "bfloat16":
            return mx.array(host).view(mx.bfloat16)
        return mx.array(host)
    if dtype == "bfloat16":
        return (host.astype(np.uint32) << 16).view(np.float32)
    return host.copy()


def encode(array: Any) -> pb.Tensor:
    data, shape, dtype = to_bytes(array)
    return pb.Tensor(data=data, shape=shape, dtype=dtype)


def decode(message: pb.Tensor, framework: str = "numpy") -> Any:
    return from_bytes(message.data, list(message.shape), message.dtype, framework)
