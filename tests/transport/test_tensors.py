"""Tensors on the wire: numpy, torch and mlx arrays survive the trip bit for bit, as little-endian bytes;
the buffer functions do it without copies where they promise to."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from meshllm.transport.proto import meshllm_pb2 as pb
from meshllm.transport.tensors import (
    WIRE_DTYPES,
    bfloat16_bits_to_float32,
    decode,
    encode,
    float32_to_bfloat16_bits,
    from_buffer,
    from_bytes,
    numpy_dtype,
    to_buffer,
    to_bytes,
    wire_array,
)

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


def test_an_unknown_framework_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown framework 'jax'"):
        from_bytes(b"\x00" * 4, [1], "float32", "jax")


# ---------------------------------------------------------------------------------------------------------
# bfloat16 as bit patterns


def test_bfloat16_rounding_matches_torch() -> None:
    rng = np.random.default_rng(0)
    values = np.concatenate(
        [
            rng.standard_normal(10_000).astype(np.float32) * 1000,
            np.array([0.0, -0.0, np.inf, -np.inf, 3.4028235e38, -3.4028235e38, 1e-40, -1e-45], np.float32),
            (np.arange(0x3F800000, 0x3F800000 + 2**17, 2**15, dtype=np.uint32) | 0x8000).view(np.float32),
        ]
    )  # the last are exact ties: rounding to even is what is tested
    expected = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(float32_to_bfloat16_bits(values), expected)
    nan = float32_to_bfloat16_bits(np.array([np.nan, -np.nan], np.float32))
    assert np.isnan((nan.astype(np.uint32) << 16).view(np.float32)).all()


def test_bfloat16_bits_round_trip_through_float32_exactly() -> None:
    every_pattern = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    finite = every_pattern[~np.isnan(bfloat16_bits_to_float32(every_pattern))]

    values = bfloat16_bits_to_float32(finite)

    assert values.dtype == np.float32
    np.testing.assert_array_equal(float32_to_bfloat16_bits(values), finite)
    np.testing.assert_array_equal(
        values, torch.from_numpy(finite.view(np.int16)).view(torch.bfloat16).float()
    )


# ---------------------------------------------------------------------------------------------------------
# Buffers: the same bytes as to_bytes / from_bytes, without the copies


@pytest.mark.parametrize(
    "array",
    [
        np.arange(12, dtype=np.float32).reshape(3, 4),
        np.arange(12, dtype=">i8").reshape(4, 3)[::2],  # big-endian and not contiguous
        np.float16(1.5),
        torch.linspace(-3, 3, 7, dtype=torch.bfloat16),
        torch.arange(6, dtype=torch.int32).reshape(2, 3).t(),
    ],
    ids=["numpy", "numpy-big-endian-strided", "numpy-scalar", "torch-bfloat16", "torch-transposed"],
)
def test_a_buffer_holds_the_bytes_to_bytes_gives(array: Any) -> None:
    view, shape, dtype = to_buffer(array)

    assert view.readonly and (bytes(view), shape, dtype) == to_bytes(array)


@needs_mlx
def test_an_mlx_bfloat16_buffer_holds_the_bytes_to_bytes_gives() -> None:
    array = mlx_array(np.linspace(-3.0, 3.0, 7), "bfloat16")

    view, shape, dtype = to_buffer(array)

    assert (bytes(view), shape, dtype) == to_bytes(array)


def test_buffers_of_contiguous_cpu_arrays_are_views_of_their_memory() -> None:
    numpy_values = np.arange(6, dtype=np.float32)
    tensor = torch.arange(6, dtype=torch.bfloat16)

    assert np.shares_memory(wire_array(numpy_values), numpy_values)
    assert np.shares_memory(wire_array(tensor), tensor.view(torch.int16).numpy())
    numpy_values[0] = 42.0
    assert np.frombuffer(to_buffer(numpy_values)[0], dtype=np.float32)[0] == 42.0


def test_buffers_of_big_endian_or_strided_arrays_are_little_endian_copies() -> None:
    big_endian = np.array([1, 256], dtype=">i4")
    strided = np.arange(8, dtype=np.int32)[::2]

    assert bytes(to_buffer(big_endian)[0]) == b"\x01\0\0\0\0\x01\0\0"
    assert not np.shares_memory(wire_array(big_endian), big_endian)
    assert not np.shares_memory(wire_array(strided), strided)
    assert wire_array(big_endian).dtype == numpy_dtype("int32") == np.dtype("<i4")


@pytest.mark.parametrize("framework", ["numpy", "torch"])
def test_from_buffer_takes_a_writable_buffer_over_without_a_copy(framework: str) -> None:
    buffer = np.arange(6, dtype=np.float32)

    result = from_buffer(buffer, (2, 3), "float32", framework)

    assert tuple(result.shape) == (2, 3)
    buffer[0] = 42.0
    assert float(result[0, 0]) == 42.0  # the same memory


def test_from_buffer_copies_read_only_data_into_a_writable_array() -> None:
    data = np.arange(6, dtype=np.int64).tobytes()

    result = from_buffer(data, (6,), "int64")

    assert result.flags.writeable and result.tolist() == list(range(6))


def test_from_buffer_gives_bfloat16_bits_as_bfloat16_or_exact_float32() -> None:
    bits = np.array([0x3F80, 0xC000, 0x7F80], np.uint16)  # 1, -2, inf

    as_torch = from_buffer(bits.copy(), (3,), "bfloat16", "torch")
    as_numpy = from_buffer(bits.tobytes(), (3,), "bfloat16", "numpy")

    assert as_torch.dtype == torch.bfloat16 and as_torch.tolist() == [1.0, -2.0, float("inf")]
    assert as_numpy.dtype == np.float32 and as_numpy.tolist() == [1.0, -2.0, float("inf")]


def test_from_bytes_never_shares_the_callers_memory() -> None:
    buffer = bytearray(np.arange(3, dtype=np.int32).tobytes())

    for framework in ["numpy", "torch"]:
        result = from_bytes(buffer, [3], "int32", framework)  # type: ignore[arg-type]
        buffer[0] = 7
        assert int(result[0]) == 0
        buffer[0] = 0
