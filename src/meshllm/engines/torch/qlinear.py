"""Linear layers whose weights stay quantized in memory: int8 per output channel, int4 in groups.

Decode reads every weight once per token, so bytes per weight set the speed: int8 halves a bfloat16
layer, int4 (with its scales and zeros) takes a little over a quarter. The matmuls are PyTorch's own
weight-only kernels (`torch._weight_int8pack_mm`; `_weight_int4pack_mm_for_cpu` on CPU and
`_weight_int4pack_mm` on CUDA and MPS), which read the packed weights directly.

- int8: `w = q * scale`, `q` in [-127, 127], one scale per output channel.
- int4: `w = (q - 8) * scale + zero`, `q` in [0, 15], one scale and zero per group of `group_size`
  consecutive inputs of an output channel: the kernels' convention. MLX's affine 4-bit weights
  (`w = q * scale + bias`) map onto it exactly with `zero = bias + 8 * scale`.

Scales and zeros are held in the activations' dtype (the kernels require it); weights are quantized
against those rounded values, so the rounding shifts which integer is chosen rather than adding to it.
The loader calls `make_linear` for a float checkpoint's layers and `mlx_linear` for MLX-packed ones.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from meshllm.engines.torch.qweights import (
    Int4Weights,
    Int8Weights,
    _row_chunks,
    dequantize_mlx,
    int4_from_mlx,
    quantize_int4,
    quantize_int8,
    unpack_mlx,
)
from meshllm.errors import ConfigError, StageError

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_GROUP_SIZE",
    "QuantizedLinear",
    "dequantize_mlx",
    "int4_from_mlx",
    "make_linear",
    "mlx_linear",
    "quantize_int4",
    "quantize_int8",
    "unpack_mlx",
]

MODES = ("int8", "int4")
INT4_GROUP_SIZES = (32, 64, 128, 256)  # what every int4 kernel accepts
# bench/qlinear_gemv.py: groups of 128 run a GEMV 3-17% faster than 64 here, but their weight error is
# 11% (normal weights) to 28% (heavy-tailed ones) larger; 64 is also what MLX checkpoints use.
DEFAULT_GROUP_SIZE = 64


@dataclass(frozen=True)
class _Int4Kernel:
    """One device type's int4 packing and matmul: the layouts differ between CPU, CUDA and MPS."""

    out_multiple: int  # out_features must be a multiple of this
    pack: Callable[[torch.Tensor], torch.Tensor]  # [n, in] int32 values on the device -> packed
    matmul: Callable[[torch.Tensor, torch.Tensor, int, torch.Tensor], torch.Tensor]
    packs_rows_apart: bool  # blocks of 64 rows packed one at a time concatenate to the whole (dim 0)


def _pack_nibbles(values: torch.Tensor) -> torch.Tensor:
    """`[n, in]` int32 in 0..15 as `[n, in / 2]` uint8, even inputs in the high nibble (CUDA, MPS)."""
    return ((values[:, ::2] << 4) | values[:, 1::2]).to(torch.uint8)


def _inner_k_tiles(in_features: int) -> int:
    """The CUDA layout packs 2, 4 or 8 tiles of 16 inputs together; the largest that divides `in`."""
    return next(tiles for tiles in (8, 4, 2) if in_features % (16 * tiles) == 0)


_INT4_KERNELS = {
    "cpu": _Int4Kernel(
        out_multiple=16,
        pack=lambda values: torch.ops.aten._convert_weight_to_int4pack_for_cpu(values, 1),
        matmul=lambda x, packed, group, scale_zeros: torch.ops.aten._weight_int4pack_mm_for_cpu(
            x, packed, group, scale_zeros
        ),
        packs_rows_apart=True,  # checked: 64-row blocks pack alone as they do together
    ),
    # Not run by the test suite (no GPU there): the layout follows PyTorch's own tests of the kernel,
    # and `_check_kernel` compares it with the pure-torch weights once per process before it is used.
    "cuda": _Int4Kernel(
        out_multiple=8,
        pack=lambda values: torch.ops.aten._convert_weight_to_int4pack(
            _pack_nibbles(values), _inner_k_tiles(values.shape[1])
        ),
        matmul=lambda x, packed, group, scale_zeros: torch.ops.aten._weight_int4pack_mm(
            x, packed, group, scale_zeros
        ),
        packs_rows_apart=True,  # the packed tensor's dim 0 is tiles of 8 rows
    ),
    "mps": _Int4Kernel(
        out_multiple=32,
        pack=lambda values: torch.ops.aten._convert_weight_to_int4pack(_pack_nibbles(values), 2),
        matmul=lambda x, packed, group, scale_zeros: torch.ops.aten._weight_int4pack_mm(
            x, packed, group, scale_zeros
        ),
        packs_rows_apart=False,
    ),
}


def kernel_problem(
    mode: str, out_features: int, in_features: int, group_size: int, dtype: torch.dtype, device: torch.device
) -> str | None:
    """Why `mode` cannot run a `[out, in]` layer in `dtype` on `device`, or None when it can."""
    if mode not in MODES:
        return f"quantization mode {mode!r} is not supported (int8, int4)"
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return f"{mode} weights need float activations, not {dtype}"
    shape = f"[{out_features}, {in_features}]"
    if mode == "int8":
        # The CPU kernel reads inputs in blocks (it crashed on in = 24 or 40); MPS needs 32 for both.
        if in_features % 32:
            return f"int8 weights need in_features a multiple of 32; the weight is {shape}"
        if device.type == "mps" and out_features % 32:
            return f"int8 weights on mps need out_features a multiple of 32; the weight is {shape}"
    else:
        kernel = _INT4_KERNELS.get(device.type)
        if kernel is None:
            return f"int4 weights are not supported on {device.type} (cpu, cuda, mps)"
        if group_size not in INT4_GROUP_SIZES:
            return f"int4 group size {group_size} is not supported (32, 64, 128, 256)"
        if in_features % group_size:
            return f"int4 weights need in_features a multiple of the group size {group_size}; the weight is {shape}"
        if out_features % kernel.out_multiple:
            return (
                f"int4 weights on {device.type} need out_features a multiple of {kernel.out_multiple};"
                f" the weight is {shape}"
            )
        if device.type == "cuda" and dtype != torch.bfloat16:
            return f"int4 weights on cuda need bfloat16 activations, not {dtype}"
    return _check_kernel(mode, dtype, device)


class QuantizedLinear(nn.Module):
    """`y = x @ w.T (+ bias)` with `w` held as int8 or packed int4, plus its scales (and zeros).

    Build one with `quantize` (from a float weight), `from_int8` / `from_int4` (already quantized
    values) or `mlx_linear`. The packed tensors are non-persistent buffers: they are not checkpoint
    tensors and never appear in a state dict. int8 weights may move between devices with `.to()`; int4
    ones are packed for one device type and refuse to run on another.
    """

    def __init__(
        self,
        mode: str,
        in_features: int,
        out_features: int,
        group_size: int | None,  # int4 only
        qweight: torch.Tensor,  # int8 [out, in], or the int4 kernel's packed layout
        scales: torch.Tensor,  # int8: [out]; int4: [in / group_size, out, 2] scale and zero pairs
        bias: torch.Tensor | None,  # [out]
        name: str = "linear",
    ):
        super().__init__()
        self.mode, self.name = mode, name
        self.in_features, self.out_features = in_features, out_features
        self.group_size = group_size
        self.packed_for = qweight.device.type  # the int4 layout is the device type's own
        self.register_buffer("qweight", qweight, persistent=False)
        self.register_buffer("scales", scales, persistent=False)
        self.register_buffer("bias", bias, persistent=False)

    qweight: torch.Tensor
    scales: torch.Tensor
    bias: torch.Tensor | None

    @classmethod
    def from_int8(
        cls, weights: Int8Weights, bias: torch.Tensor | None, dtype: torch.dtype, name: str = "linear"
    ) -> QuantizedLinear:
        out_features, in_features = weights.values.shape
        _require("int8", out_features, in_features, 0, dtype, weights.values.device, name)
        return cls._int8(weights, bias, dtype, name)

    @classmethod
    def from_int4(
        cls, weights: Int4Weights, bias: torch.Tensor | None, dtype: torch.dtype, name: str = "linear"
    ) -> QuantizedLinear:
        """Pack `weights` for the kernel of the device they lie on."""
        out_features, in_features = weights.values.shape
        _require("int4", out_features, in_features, weights.group_size, dtype, weights.values.device, name)
        return cls._int4(weights, bias, dtype, name)

    @classmethod
    def _int8(
        cls, weights: Int8Weights, bias: torch.Tensor | None, dtype: torch.dtype, name: str
    ) -> QuantizedLinear:
        out_features, in_features = weights.values.shape
        bias = None if bias is None else bias.to(weights.values.device, dtype)
        values, scales = weights.values.contiguous(), weights.scales.to(dtype)
        return cls("int8", in_features, out_features, None, values, scales, bias, name)

    @classmethod
    def _int4(
        cls, weights: Int4Weights, bias: torch.Tensor | None, dtype: torch.dtype, name: str
    ) -> QuantizedLinear:
        out_features, in_features = weights.values.shape
        device = weights.values.device
        kernel = _INT4_KERNELS[device.type]
        chunks = _row_chunks(out_features, in_features) if kernel.packs_rows_apart else [slice(None)]
        # int32 values only a chunk at a time: 4 bytes per weight for a whole lm_head would be a lot
        packed = torch.cat(
            [kernel.pack(weights.values[rows].to(torch.int32).contiguous()) for rows in chunks]
        )
        scale_zeros = torch.stack([weights.scales, weights.zeros], dim=-1)  # [out, groups, 2]
        scale_zeros = scale_zeros.transpose(0, 1).contiguous().to(dtype)  # [groups, out, 2]
        bias = None if bias is None else bias.to(device, dtype)
        return cls("int4", in_features, out_features, weights.group_size, packed, scale_zeros, bias, name)

    @classmethod
    def quantize(
        cls,
        weight: torch.Tensor,  # [out, in] float, anywhere
        bias: torch.Tensor | None,
        mode: str,
        group_size: int = DEFAULT_GROUP_SIZE,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cpu",
        name: str = "linear",
    ) -> QuantizedLinear:
        """Quantize `weight` on `device`, a row chunk at a time; no float copy of it is kept."""
        device = torch.device(device)
        out_features, in_features = weight.shape
        _require(mode, out_features, in_features, group_size, dtype, device, name)
        chunks = _row_chunks(out_features, in_features)
        if mode == "int8":
            parts8 = [quantize_int8(weight[rows].to(device), dtype) for rows in chunks]
            int8 = Int8Weights(torch.cat([p.values for p in parts8]), torch.cat([p.scales for p in parts8]))
            return cls.from_int8(int8, bias, dtype, name)
        parts4 = [quantize_int4(weight[rows].to(device), group_size, dtype) for rows in chunks]
        int4 = Int4Weights(
            torch.cat([p.values for p in parts4]),
            torch.cat([p.scales for p in parts4]),
            torch.cat([p.zeros for p in parts4]),
        )
        return cls.from_int4(int4, bias, dtype, name)

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype the kernel computes in: that of the scales."""
        return self.scales.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`[..., in]` -> `[..., out]` in x's dtype."""
        leading = x.shape[:-1]
        inputs = x.reshape(-1, self.in_features).to(self.dtype).contiguous()  # [T, in]
        if self.mode == "int8":
            out = torch._weight_int8pack_mm(inputs, self.qweight, self.scales)
        else:
            if self.qweight.device.type != self.packed_for:
                raise StageError(
                    f"{self.name}: int4 weights packed for {self.packed_for} cannot run on"
                    f" {self.qweight.device.type}; quantize them on the device they run on"
                )
            assert self.group_size is not None  # set for every int4 layer
            out = _INT4_KERNELS[self.packed_for].matmul(inputs, self.qweight, self.group_size, self.scales)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*leading, self.out_features).to(x.dtype)

    def weight_bytes(self) -> int:
        """Bytes held: the packed weights, the scales (and zeros) and the bias."""
        tensors = [self.qweight, self.scales] + ([self.bias] if self.bias is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.group_size else ""
        return (
            f"{self.name}: {self.mode}, in={self.in_features}, out={self.out_features}{group}, {self.dtype}"
        )


def _require(
    mode: str,
    out_features: int,
    in_features: int,
    group_size: int,
    dtype: torch.dtype,
    device: torch.device,
    name: str,
) -> None:
    problem = kernel_problem(mode, out_features, in_features, group_size, dtype, device)
    if problem is not None:
        raise ConfigError(f"{name}: {problem}")


@functools.cache
def _check_kernel(mode: str, dtype: torch.dtype, device: torch.device) -> str | None:
    """Run the kernel once on a small layer and compare it with the pure-torch weights; None when right.

    Catches a PyTorch without the kernel for this device, and a packing layout it reads differently.
    """
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 256, generator=generator)
    x = torch.randn(3, 256, generator=generator)
    try:
        layer: QuantizedLinear
        if mode == "int8":
            int8 = quantize_int8(weight.to(device), dtype)
            layer, expected = QuantizedLinear._int8(int8, None, dtype, "check"), int8.dequantize()
        else:
            int4 = quantize_int4(weight.to(device), 64, dtype)
            layer, expected = QuantizedLinear._int4(int4, None, dtype, "check"), int4.dequantize()
        got = layer(x.to(device, dtype)).float().cpu()
    except Exception as error:  # any failure means the kernel is unusable here; say which
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return (
            f"{mode} weights cannot run on {device} in {dtype} with PyTorch {torch.__version__}: {first_line}"
        )
    reference = x.to(dtype).float() @ expected.cpu().T
    mismatch = float((got - reference).norm() / reference.norm())
    if not mismatch < 1e-2:
        return f"PyTorch {torch.__version__}'s {mode} kernel on {device} disagrees with the weights it was given (relative error {mismatch:.2g})"
    return None


def make_linear(
    weight: torch.Tensor,  # [out, in] float
    bias: torch.Tensor | None,  # [out]
    mode: str | None,  # "int8", "int4", or None for a float layer
    group_size: int = DEFAULT_GROUP_SIZE,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    name: str = "linear",
) -> nn.Module:
    """A linear layer of a float checkpoint: quantized as `mode` asks, or float in `dtype`.

    A layer the kernel cannot take (shape, device, dtype) is a ConfigError naming `name`.
    """
    if mode is None:
        return _float_linear(weight, bias, dtype, torch.device(device))
    return QuantizedLinear.quantize(weight, bias, mode, group_size, dtype, device, name)


def mlx_linear(
    packed: torch.Tensor,  # [out, in * bits / 32] uint32
    scales: torch.Tensor,  # [out, in / group_size]
    biases: torch.Tensor,  # [out, in / group_size]
    bits: int,
    group_size: int,
    bias: torch.Tensor | None,  # the layer's own bias, [out], if it has one
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    name: str = "linear",
) -> nn.Module:
    """A linear layer of an MLX affine-quantized checkpoint.

    - 4 bits: onto the int4 kernel as they are (no requantizing): in float32 exact up to float rounding;
      in 16-bit dtypes each group's scale and zero are rounded to that dtype.
    - 8 bits: the int8 kernel is symmetric per channel, so the weights are dequantized and requantized;
      the error against the MLX weights is logged.
    - other widths, or a layer the kernel cannot take here: dequantized to a float layer, as before.
    """
    if bits not in (2, 4, 8):
        raise ConfigError(f"{name}: {bits}-bit MLX weights are not supported by the torch engine (2, 4, 8)")
    device = torch.device(device)
    out_features = packed.shape[0]
    in_features = packed.shape[1] * 32 // bits
    if scales.shape != biases.shape or scales.shape != (out_features, in_features // group_size):
        raise ConfigError(
            f"{name}: packed weights {tuple(packed.shape)} at {bits} bits in groups of {group_size}"
            f" do not match scales {tuple(scales.shape)} and biases {tuple(biases.shape)}"
        )
    packed, scales, biases = packed.to(device), scales.to(device), biases.to(device)
    mode = {4: "int4", 8: "int8"}.get(bits)
    problem = (
        None if mode is None else kernel_problem(mode, out_features, in_features, group_size, dtype, device)
    )
    if mode is None or problem is not None:
        if problem is not None:
            log.info("%s: %d-bit weights dequantized to %s: %s", name, bits, dtype, problem)
        return _float_linear(dequantize_mlx(packed, scales, biases, bits), bias, dtype, device)
    if mode == "int4":
        return QuantizedLinear.from_int4(int4_from_mlx(packed, scales, biases, dtype), bias, dtype, name)
    return QuantizedLinear.from_int8(_requantize_int8(packed, scales, biases, dtype, name), bias, dtype, name)


def _requantize_int8(
    packed: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor, dtype: torch.dtype, name: str
) -> Int8Weights:
    """MLX 8-bit weights dequantized and quantized again per channel, a row chunk at a time; logs the error."""
    parts, error, largest = [], 0.0, 0.0
    for rows in _row_chunks(packed.shape[0], packed.shape[1] * 4):
        weight = dequantize_mlx(packed[rows], scales[rows], biases[rows], 8)  # [rows, in] float32
        part = quantize_int8(weight, dtype)
        error = max(error, (part.dequantize() - weight).abs().max().item())
        largest = max(largest, weight.abs().max().item())
        parts.append(part)
    log.info(
        "%s: 8-bit MLX weights requantized to int8 per channel: max abs error %.3g, %.3g of the largest weight",
        name,
        error,
        error / largest if largest else 0.0,
    )
    return Int8Weights(torch.cat([p.values for p in parts]), torch.cat([p.scales for p in parts]))


def _float_linear(
    weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype, device: torch.device
) -> nn.Linear:
    """An `nn.Linear` holding exactly `weight` and `bias` in `dtype` (no random initialisation)."""
    out_features, in_features = weight.shape
    layer = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
    layer.weight = nn.Parameter(weight.to(device, dtype), requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias.to(device, dtype), requires_grad=False)
    return layer
