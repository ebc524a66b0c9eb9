"""Quantized linear layers: int8 per channel and int4 in groups, through PyTorch's weight-only kernels.

Bounds, on random normal weights: against `F.linear` with the original float weights, cosine similarity
above 0.999 for int8 and 0.99 for int4; against a pure-torch matmul with the same quantized values
(`Int8Weights.dequantize`, `Int4Weights.dequantize`), relative error below 1e-5 in float32 and 1e-2 in
bfloat16 (the kernels round their output to bfloat16). MLX's own 4-bit weights, made by `mx.quantize`,
run through the int4 kernel without requantizing: equal to `mx.dequantize`'s weights up to float32
rounding, and in bfloat16 within one rounding of each group's scale and zero.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from meshllm.engines.torch.qlinear import (
    DEFAULT_GROUP_SIZE,
    QuantizedLinear,
    int4_from_mlx,
    make_linear,
    mlx_linear,
    quantize_int4,
    quantize_int8,
)
from meshllm.engines.torch.quantized import dequantize
from meshllm.errors import ConfigError, StageError

DTYPES = [torch.bfloat16, torch.float32]
DTYPE_IDS = ["bf16", "fp32"]
# (out, in): a q/k/v-sized layer, an MLP projection, and a tall lm_head-like one past one packing chunk
SHAPES = [(48, 256), (3072, 1024), (8256, 1024)]
KERNEL_BOUND = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def random_weight(out_features: int, in_features: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(out_features, in_features, generator=generator) * 0.02


def random_inputs(n_tokens: int, in_features: int, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n_tokens, in_features, generator=generator).to(dtype)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0).item()


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.float() - expected.float()).norm() / expected.float().norm()).item()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda shape: f"{shape[0]}x{shape[1]}")
def test_int8_output_is_close_to_the_float_layer(shape, dtype):
    weight = random_weight(*shape)
    layer = QuantizedLinear.quantize(weight, None, "int8", dtype=dtype)
    x = random_inputs(5, shape[1], dtype)
    assert cosine(layer(x), F.linear(x.float(), weight)) > 0.999


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda shape: f"{shape[0]}x{shape[1]}")
def test_int4_output_is_close_to_the_float_layer(shape, dtype):
    weight = random_weight(*shape)
    layer = QuantizedLinear.quantize(weight, None, "int4", group_size=64, dtype=dtype)
    x = random_inputs(5, shape[1], dtype)
    assert cosine(layer(x), F.linear(x.float(), weight)) > 0.99


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda shape: f"{shape[0]}x{shape[1]}")
def test_int8_kernel_equals_a_matmul_with_its_quantized_values(shape, dtype):
    weight = random_weight(*shape)
    values = quantize_int8(weight, dtype)
    layer = QuantizedLinear.from_int8(values, None, dtype)
    x = random_inputs(5, shape[1], dtype)
    out = layer(x)
    assert out.dtype == dtype and out.shape == (5, shape[0])
    assert relative_error(out, x.float() @ values.dequantize().T) < KERNEL_BOUND[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("group_size", [32, 64, 128, 256])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda shape: f"{shape[0]}x{shape[1]}")
def test_int4_kernel_equals_a_matmul_with_its_quantized_values(shape, group_size, dtype):
    weight = random_weight(*shape)
    values = quantize_int4(weight, group_size, dtype)
    layer = QuantizedLinear.from_int4(values, None, dtype)
    x = random_inputs(5, shape[1], dtype)
    out = layer(x)
    assert out.dtype == dtype and out.shape == (5, shape[0])
    assert relative_error(out, x.float() @ values.dequantize().T) < KERNEL_BOUND[dtype]


def test_quantize_equals_quantizing_the_whole_weight_at_once():
    """`quantize` works in row chunks (8256 rows is more than one); the result is the same."""
    weight = random_weight(8256, 1024)
    layer = QuantizedLinear.quantize(weight, None, "int4", group_size=64, dtype=torch.bfloat16)
    whole = QuantizedLinear.from_int4(quantize_int4(weight, 64, torch.bfloat16), None, torch.bfloat16)
    assert torch.equal(layer.qweight, whole.qweight) and torch.equal(layer.scales, whole.scales)


def test_int4_values_and_scales_reproduce_each_group():
    weight = random_weight(64, 256)
    values = quantize_int4(weight, 64, torch.float32)
    assert values.values.dtype == torch.uint8 and int(values.values.max()) <= 15
    # within half a step of each group's scale, the step of a 4-bit grid over the group's range
    error = (values.dequantize() - weight).abs().view(64, 4, 64).amax(dim=-1)
    assert torch.all(error <= values.scales * 0.5 + 1e-7)


def test_bias_is_added_after_the_product():
    weight, bias = random_weight(64, 256), torch.randn(64)
    x = random_inputs(3, 256, torch.bfloat16)
    for mode in ("int8", "int4"):
        with_bias = QuantizedLinear.quantize(weight, bias, mode, dtype=torch.bfloat16)
        without = QuantizedLinear.quantize(weight, None, mode, dtype=torch.bfloat16)
        assert torch.equal(with_bias(x), without(x) + bias.to(torch.bfloat16))


def test_output_has_the_input_dtype_and_leading_dimensions():
    layer = QuantizedLinear.quantize(random_weight(64, 256), None, "int4", dtype=torch.bfloat16)
    x = random_inputs(6, 256, torch.float32)
    out = layer(x.view(2, 3, 256))
    assert out.dtype == torch.float32 and out.shape == (2, 3, 64)
    assert torch.equal(out.view(6, 64), layer(x.to(torch.bfloat16)).float())


@pytest.mark.parametrize("shape", [(3072, 1024), (8256, 1024)], ids=["3072x1024", "8256x1024"])
def test_weight_bytes_are_half_and_a_quarter_of_bfloat16(shape):
    out_features, in_features = shape
    weight = random_weight(*shape).to(torch.bfloat16)
    bf16_bytes = out_features * in_features * 2
    int8 = QuantizedLinear.quantize(weight, None, "int8", dtype=torch.bfloat16)
    int4 = QuantizedLinear.quantize(weight, None, "int4", group_size=64, dtype=torch.bfloat16)
    # int8: a byte a weight and a bfloat16 scale a row
    assert int8.weight_bytes() == out_features * in_features + 2 * out_features
    assert 0.5 <= int8.weight_bytes() / bf16_bytes < 0.51
    # int4: half a byte a weight and a bfloat16 scale and zero per 64 of them
    assert int4.weight_bytes() == out_features * in_features // 2 + (in_features // 64) * out_features * 4
    assert 0.25 <= int4.weight_bytes() / bf16_bytes < 0.29
    for layer in (int8, int4):  # no float copy of the weight is kept
        held = list(layer.buffers()) + list(layer.parameters())
        assert not any(t.is_floating_point() and t.numel() >= out_features * in_features for t in held)
        assert layer.state_dict() == {}  # nothing that looks like a checkpoint tensor


def test_make_linear_without_a_mode_is_the_float_layer():
    weight, bias = random_weight(64, 256), torch.randn(64)
    layer = make_linear(weight, bias, None, dtype=torch.bfloat16)
    assert isinstance(layer, nn.Linear) and not isinstance(layer, QuantizedLinear)
    assert layer.weight.dtype == torch.bfloat16
    x = random_inputs(3, 256, torch.bfloat16)
    assert torch.equal(layer(x), F.linear(x, weight.to(torch.bfloat16), bias.to(torch.bfloat16)))


def test_make_linear_quantizes_as_asked():
    layer = make_linear(random_weight(64, 256), None, "int4", 32, torch.bfloat16, "cpu", name="q_proj")
    assert isinstance(layer, QuantizedLinear)
    assert (layer.mode, layer.group_size, layer.dtype) == ("int4", 32, torch.bfloat16)
    assert DEFAULT_GROUP_SIZE == 64


@pytest.mark.parametrize(
    ("mode", "shape", "group_size", "expected"),
    [
        ("int4", (64, 96), 64, "in_features a multiple of the group size 64; the weight is [64, 96]"),
        ("int4", (40, 256), 64, "out_features a multiple of 16; the weight is [40, 256]"),
        ("int4", (64, 256), 16, "group size 16 is not supported"),
        ("int8", (64, 40), 64, "in_features a multiple of 32; the weight is [64, 40]"),
        ("int3", (64, 256), 64, "quantization mode 'int3' is not supported"),
    ],
    ids=["int4-in", "int4-out", "int4-group", "int8-in", "mode"],
)
def test_a_layer_the_kernel_cannot_take_is_a_config_error_naming_it(mode, shape, group_size, expected):
    name = "model.layers.3.mlp.down_proj"
    with pytest.raises(ConfigError, match=rf"^{name}: .*") as error:
        make_linear(random_weight(*shape), None, mode, group_size, torch.bfloat16, "cpu", name=name)
    assert expected in str(error.value)


def test_int4_weights_refuse_to_run_on_another_device_type():
    layer = QuantizedLinear.quantize(
        random_weight(64, 256), None, "int4", dtype=torch.bfloat16, name="o_proj"
    )
    layer.to("meta")
    with pytest.raises(StageError, match="o_proj: int4 weights packed for cpu cannot run on meta"):
        layer(torch.empty(1, 256, dtype=torch.bfloat16, device="meta"))


def test_a_device_without_the_kernel_is_a_config_error_naming_the_layer():
    """The kernel is tried once per mode, dtype and device before any layer uses it."""
    with pytest.raises(ConfigError, match="^lm_head: int8 weights cannot run on meta in torch.bfloat16"):
        make_linear(random_weight(64, 256), None, "int8", 64, torch.bfloat16, "meta", name="lm_head")
    with pytest.raises(ConfigError, match="^lm_head: int4 weights are not supported on meta"):
        make_linear(random_weight(64, 256), None, "int4", 64, torch.bfloat16, "meta", name="lm_head")


# MLX's packed weights, made by MLX itself


@pytest.fixture(scope="module")
def mx():
    return pytest.importorskip("mlx.core")


def to_torch(array) -> torch.Tensor:
    """An mx.array as a torch tensor (numpy has no bfloat16: its bits travel as uint16)."""
    import mlx.core

    if array.dtype == mlx.core.bfloat16:
        return torch.from_numpy(np.array(array.view(mlx.core.uint16))).view(torch.bfloat16)
    return torch.from_numpy(np.array(array))


def mlx_quantized(mx, shape, bits, group_size, dtype, seed=0):
    """(packed, scales, biases) from `mx.quantize`, and `mx.dequantize`'s float32 weights, as torch tensors."""
    weight = (mx.random.normal(shape, key=mx.random.key(seed)) * 0.02).astype(dtype)
    packed, scales, biases = mx.quantize(weight, group_size=group_size, bits=bits)
    parts = (packed, scales.astype(mx.float32), biases.astype(mx.float32))
    expected = mx.dequantize(*parts, group_size=group_size, bits=bits)
    return to_torch(packed), to_torch(scales), to_torch(biases), to_torch(expected)


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_mlx_4bit_weights_in_float32_equal_mx_dequantize(mx, group_size):
    packed, scales, biases, expected = mlx_quantized(mx, (256, 1024), 4, group_size, mx.float32)
    layer = mlx_linear(packed, scales, biases, 4, group_size, None, torch.float32)
    assert isinstance(layer, QuantizedLinear) and layer.mode == "int4"
    effective = int4_from_mlx(packed, scales, biases, torch.float32).dequantize()
    assert (effective - expected).abs().max().item() <= 1e-7  # (q - 8) * s + (b + 8 s) vs q * s + b
    x = random_inputs(5, 1024, torch.float32)
    assert relative_error(layer(x), x @ expected.T) < 1e-5


@pytest.mark.parametrize("checkpoint_dtype", ["float32", "bfloat16", "float16"])
def test_mlx_4bit_weights_in_bfloat16_are_within_one_rounding_of_scale_and_zero(mx, checkpoint_dtype):
    packed, scales, biases, expected = mlx_quantized(mx, (256, 1024), 4, 64, getattr(mx, checkpoint_dtype))
    assert torch.equal(dequantize(packed, scales, biases, 4), expected)  # the float32 reference
    layer = mlx_linear(packed, scales, biases, 4, 64, None, torch.bfloat16)
    effective = int4_from_mlx(packed, scales, biases, torch.bfloat16).dequantize()
    error = (effective - expected).abs().max().item()
    # |dw| <= |q - 8| |ds| + |dz|, each of ds, dz half a bfloat16 ulp: at most 2^-8 of the value
    zeros = biases.float() + 8 * scales.float()
    assert error <= 2**-8 * (8 * scales.float().abs().max().item() + zeros.abs().max().item())
    if checkpoint_dtype == "bfloat16":
        assert error == 0.0  # MLX's bfloat16 scale and bias leave the zero exact in bfloat16
    x = random_inputs(5, 1024, torch.bfloat16)
    assert relative_error(layer(x), x.float() @ effective.T) < 1e-2


def test_mlx_8bit_weights_are_requantized_per_channel_and_the_error_logged(mx, caplog):
    packed, scales, biases, expected = mlx_quantized(mx, (256, 1024), 8, 64, mx.bfloat16)
    with caplog.at_level(logging.INFO, logger="meshllm.engines.torch.qlinear"):
        layer = mlx_linear(packed, scales, biases, 8, 64, None, torch.bfloat16, name="layers.0.mlp.up_proj")
    assert isinstance(layer, QuantizedLinear) and layer.mode == "int8"
    assert "layers.0.mlp.up_proj: 8-bit MLX weights requantized to int8 per channel" in caplog.text
    x = random_inputs(5, 1024, torch.bfloat16)
    # half a step of 127 per row's largest weight, plus the bfloat16 rounding of the scale
    row_scale = expected.abs().amax(dim=1) / 127
    assert relative_error(layer(x), x.float() @ expected.T) < 1e-2
    assert cosine(layer(x), x.float() @ expected.T) > 0.9999
    requantized = quantize_int8(expected, torch.bfloat16).dequantize()
    assert torch.all((requantized - expected).abs().amax(dim=1) <= row_scale * 0.5 * (1 + 2**-7))


def test_mlx_2bit_weights_are_dequantized_to_a_float_layer(mx):
    packed, scales, biases, expected = mlx_quantized(mx, (64, 256), 2, 64, mx.float32)
    bias = torch.randn(64)
    layer = mlx_linear(packed, scales, biases, 2, 64, bias, torch.float32)
    assert isinstance(layer, nn.Linear)
    assert torch.equal(layer.weight, expected) and torch.equal(layer.bias, bias)


def test_mlx_4bit_weights_the_kernel_cannot_take_stay_float(mx):
    packed, scales, biases, expected = mlx_quantized(mx, (40, 256), 4, 64, mx.float32)  # 40 rows: not 16k
    layer = mlx_linear(packed, scales, biases, 4, 64, None, torch.float32)
    assert isinstance(layer, nn.Linear) and torch.equal(layer.weight, expected)


def test_mlx_weights_that_do_not_match_their_scales_are_a_config_error(mx):
    packed, scales, biases, _ = mlx_quantized(mx, (64, 256), 4, 64, mx.float32)
    with pytest.raises(ConfigError, match="^k_proj: packed weights"):
        mlx_linear(packed, scales, biases, 4, 32, None, torch.float32, name="k_proj")
    with pytest.raises(ConfigError, match="^k_proj: 3-bit MLX weights are not supported"):
        mlx_linear(packed, scales, biases, 3, 64, None, torch.float32, name="k_proj")


# The GPU kernels: run only where there is one (the CUDA layout follows PyTorch's own tests)


def accelerators() -> list[str]:
    found = ["cuda"] if torch.cuda.is_available() else []
    return found + (["mps"] if torch.backends.mps.is_available() else [])


@pytest.mark.skipif(not accelerators(), reason="no CUDA or MPS device")
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_gpu_kernels_equal_a_matmul_with_their_quantized_values(mode):
    for device in accelerators():
        weight = random_weight(3072, 1024).to(device)
        x = random_inputs(5, 1024, torch.bfloat16).to(device)
        if mode == "int8":
            values = quantize_int8(weight, torch.bfloat16)
            layer = QuantizedLinear.from_int8(values, None, torch.bfloat16)
        else:
            values = quantize_int4(weight, 64, torch.bfloat16)
            layer = QuantizedLinear.from_int4(values, None, torch.bfloat16)
        expected = x.float() @ values.dequantize().T
        assert relative_error(layer(x), expected) < 1e-2, device
