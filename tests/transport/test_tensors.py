"""Tensors on the wire: numpy, torch and mlx arrays survive the trip bit for bit, as little-endian bytes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from meshllm.transport.proto import meshllm_pb2 as pb
from meshllm.transport.tensors import WIRE_DTYPES, decode, encode, from_bytes, to_bytes

try:
    import mlx.core as mx
except ImportError:  # mlx is optional: its cases are skipped without it
    mx = None

needs_mlx = pytest.mark.skipif(mx is None, reason="mlx is not installed")

SHAPES = [(), (0,), (3, 0, 2), (7,), (1, 1, 3), (2, 3, 5)]
NUMPY_DTYPES = [name for name in WIRE_DTYPES if name != "bfloat16"]  # numpy has no bfloat16


def sample_values(shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """Values that fill every byte: large magnitudes for integers, varied signs and fractions for floats."""
    rng = np.random.default_rng(0)
    if dtype.startswith("int"):
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
    return rng.normal(0.0, 100.0, size=shape).astype(np.float32)


def torch_tensor(values: np.ndarray, dtype: str) -> torch.Tensor:
    return torch.from_numpy(np.array(values)).to(getattr(torch, dtype))


def mlx_array(values: np.ndarray, dtype: str) -> Any:
    return mx.array(np.array(values)).astype(getattr(mx, dtype))


def through_the_wire(array: Any, framework: str) -> Any:
    """encode -> serialised protobuf message -> decode into `framework`."""
    message = pb.Tensor.FromString(encode(array).SerializeToString())
    return decode(message, framework)


def torch_bits(tensor: torch.Tensor) -> np.ndarray:
    """The raw bit patterns of a torch tensor, as unsigned integers of its width."""
    width = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()]
    return tensor.contiguous().view(width).numpy()


def mlx_bits(array: Any) -> np.ndarray:
    width = {2: mx.uint16, 4: mx.uint32, 8: mx.uint64}[array.dtype.size]
    return np.array(array.view(width))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", NUMPY_DTYPES)
def test_numpy_round_trip(dtype: str, shape: tuple[int, ...]) -> None:
    array = sample_values(shape, dtype).astype(dtype)

    result = through_the_wire(array, "numpy")

    assert result.dtype == array.dtype and result.shape == shape
    np.testing.assert_array_equal(result, array)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", WIRE_DTYPES)
def test_torch_round_trip(dtype: str, shape: tuple[int, ...]) -> None:
    tensor = torch_tensor(sample_values(shape, dtype), dtype)

    result = through_the_wire(tensor, "torch")

    assert result.dtype == tensor.dtype and tuple(result.shape) == shape
    np.testing.assert_array_equal(torch_bits(result), torch_bits(tensor))


@needs_mlx
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", WIRE_DTYPES)
def test_mlx_round_trip(dtype: str, shape: tuple[int, ...]) -> None:
    array = mlx_array(sample_values(shape, dtype), dtype)

    result = through_the_wire(array, "mlx")

    assert result.dtype == array.dtype and tuple(result.shape) == shape
    np.testing.assert_array_equal(mlx_bits(result), mlx_bits(array))


@needs_mlx
def test_torch_bfloat16_arrives_in_mlx_bit_exact() -> None:
    values = torch.randn(4, 33, generator=torch.Generator().manual_seed(0)) * 1000
    special = torch.tensor([float("inf"), float("-inf"), -0.0, 0.0, 1e-40, float("nan")])
    tensor = torch.cat([values.flatten(), special]).to(torch.bfloat16)

    result = through_the_wire(tensor, "mlx")

    assert result.dtype == mx.bfloat16
    np.testing.assert_array_equal(mlx_bits(result), torch_bits(tensor).view(np.uint16))


@needs_mlx
def test_mlx_bfloat16_arrives_in_torch_bit_exact() -> None:
    array = mlx_array(np.linspace(-300.0, 300.0, 101), "bfloat16")

    result = through_the_wire(array, "torch")

    assert result.dtype == torch.bfloat16
    np.testing.assert_array_equal(torch_bits(result).view(np.uint16), mlx_bits(array))


def test_bfloat16_arrives_in_numpy_as_exact_float32() -> None:
    tensor = torch.tensor([1.5, -2.25, 3e38, -1e-38], dtype=torch.bfloat16)

    result = through_the_wire(tensor, "numpy")

    assert result.dtype == np.float32
    np.testing.assert_array_equal(result, tensor.float().numpy())


def test_non_contiguous_tensors_travel_in_their_logical_order() -> None:
    tensor = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    array = np.asfortranarray(np.arange(12, dtype=np.int32).reshape(3, 4))

    np.testing.assert_array_equal(through_the_wire(tensor.T, "torch"), tensor.T)
    np.testing.assert_array_equal(through_the_wire(tensor[:, ::2], "torch"), tensor[:, ::2])
    np.testing.assert_array_equal(through_the_wire(array, "numpy"), array)


@needs_mlx
def test_non_contiguous_mlx_arrays_travel_in_their_logical_order() -> None:
    array = np.arange(12, dtype=np.int32).reshape(3, 4)

    np.testing.assert_array_equal(through_the_wire(mx.array(array).T, "numpy"), array.T)


@pytest.mark.parametrize(
    ("make_array", "expected_bytes", "expected_dtype"),
    [
        pytest.param(
            lambda: np.array([1, 256], dtype=np.int32), b"\x01\0\0\0\0\x01\0\0", "int32", id="int32"
        ),
        pytest.param(
            lambda: np.array([1, 256], dtype=">i4"), b"\x01\0\0\0\0\x01\0\0", "int32", id="big-endian int32"
        ),
        pytest.param(lambda: np.array([1], dtype=np.int64), b"\x01" + b"\0" * 7, "int64", id="int64"),
        pytest.param(lambda: np.array([1.0], dtype=np.float32), b"\0\0\x80\x3f", "float32", id="float32"),
        pytest.param(lambda: np.array([1.0], dtype=">f2"), b"\0\x3c", "float16", id="big-endian float16"),
        pytest.param(
            lambda: torch.tensor([1.0], dtype=torch.bfloat16), b"\x80\x3f", "bfloat16", id="torch bfloat16"
        ),
        pytest.param(
            lambda: mx.array([1.0], dtype=mx.bfloat16),
            b"\x80\x3f",
            "bfloat16",
            id="mlx bfloat16",
            marks=needs_mlx,
        ),
    ],
)
def test_bytes_are_little_endian(
    make_array: Callable[[], Any], expected_bytes: bytes, expected_dtype: str
) -> None:
    array = make_array()

    data, shape, dtype = to_bytes(array)

    assert (data, shape, dtype) == (expected_bytes, [len(array)], expected_dtype)


@pytest.mark.parametrize(
    "array",
    [
        np.zeros(3, dtype=np.float64),
        torch.zeros(3, dtype=torch.float64),
        np.zeros(3, dtype=np.uint8),
        torch.zeros(3, dtype=torch.bool),
    ],
    ids=["numpy float64", "torch float64", "numpy uint8", "torch bool"],
)
def test_unsupported_dtype_raises_type_error_naming_it(array: Any) -> None:
    name = str(array.dtype).rsplit(".", 1)[-1]

    with pytest.raises(TypeError, match=name):
        encode(array)


def test_unknown_wire_dtype_is_refused_on_decode() -> None:
    with pytest.raises(ValueError, match="float64"):
        from_bytes(b"\x00" * 8, [1], "float64")
