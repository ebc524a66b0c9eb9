"""Quantized weight values, independent of any kernel: int8 per output channel and int4 in groups, made
from float weights or unpacked from MLX's affine layout, and dequantized back for checks."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from meshllm.errors import ConfigError

_CHUNK_ELEMENTS = 1 << 22  # rows are quantized and packed about 4M weights at a time, to bound temporaries


@dataclass(frozen=True)
class Int8Weights:
    """Symmetric per-channel int8: `w = values * scales[:, None]`."""

    values: torch.Tensor  # [out, in] int8 in [-127, 127]
    scales: torch.Tensor  # [out] float32 (already rounded to the layer's dtype)

    def dequantize(self) -> torch.Tensor:
        """The float32 `[out, in]` weights the kernel computes with."""
        return self.values.float() * self.scales.float()[:, None]


@dataclass(frozen=True)
class Int4Weights:
    """Asymmetric group-wise 4-bit values before packing: `w = (values - 8) * scale + zero` per group."""

    values: torch.Tensor  # [out, in] uint8 in [0, 15]
    scales: torch.Tensor  # [out, in / group_size] float32 (already rounded to the layer's dtype)
    zeros: torch.Tensor  # [out, in / group_size] float32 (likewise)

    @property
    def group_size(self) -> int:
        return self.values.shape[1] // self.scales.shape[1]

    def dequantize(self) -> torch.Tensor:
        """The float32 `[out, in]` weights the kernel computes with."""
        out_features, n_groups = self.scales.shape
        values = self.values.float().view(out_features, n_groups, -1) - 8  # [out, groups, group_size]
        weight = values * self.scales.float()[..., None] + self.zeros.float()[..., None]
        return weight.view(out_features, -1)


def _row_chunks(out_features: int, in_features: int) -> list[slice]:
    """Row ranges of about `_CHUNK_ELEMENTS` weights, each a multiple of 64 rows (the CPU packing's block)."""
    rows = max(64, _CHUNK_ELEMENTS // in_features // 64 * 64)
    return [slice(start, min(start + rows, out_features)) for start in range(0, out_features, rows)]


def quantize_int8(weight: torch.Tensor, dtype: torch.dtype) -> Int8Weights:
    """Per-channel symmetric int8 of a float `[out, in]` weight, computed in float32 where it lies."""
    weight = weight.float()
    scales = (weight.abs().amax(dim=1) / 127).clamp(min=torch.finfo(dtype).tiny)
    scales = scales.to(dtype).float()  # the stored scale is the one to quantize against
    values = torch.round(weight / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return Int8Weights(values, scales)


def quantize_int4(weight: torch.Tensor, group_size: int, dtype: torch.dtype) -> Int4Weights:
    """Group-wise asymmetric 4-bit of a float `[out, in]` weight (min to max of each group over 0..15)."""
    out_features, in_features = weight.shape
    groups = weight.float().view(out_features, in_features // group_size, group_size)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)  # [out, groups]
    scales = ((high - low) / 15).clamp(min=torch.finfo(dtype).tiny).to(dtype).float()
    zeros = (low + 8 * scales).to(dtype).float()  # q = 0 is the group's minimum
    values = torch.round((groups - zeros[..., None]) / scales[..., None] + 8).clamp(0, 15)
    return Int4Weights(values.to(torch.uint8).view(out_features, in_features), scales, zeros)


def unpack_mlx(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """MLX's uint32 words `[out, in * bits / 32]` as `[out, in]` uint8 values (first value in the lowest bits)."""
    if bits not in (2, 4, 8):
        raise ConfigError(f"{bits}-bit MLX weights cannot be unpacked here (2, 4 or 8 bits)")
    out_features = packed.shape[0]
    as_bytes = packed.contiguous().view(torch.uint8).reshape(out_features, -1)  # little-endian words
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)  # [values per byte]
    values = (as_bytes[..., None] >> shifts) & ((1 << bits) - 1)  # [out, in * bits / 8, 8 / bits]
    return values.reshape(out_features, -1)


def int4_from_mlx(
    packed: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor, dtype: torch.dtype
) -> Int4Weights:
    """MLX affine 4-bit weights in the kernels' convention, without requantizing: `zero = bias + 8 * scale`."""
    scales = scales.float()
    zeros = biases.float() + 8 * scales
    return Int4Weights(unpack_mlx(packed, 4), scales.to(dtype).float(), zeros.to(dtype).float())


def dequantize_mlx(
    packed: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor, bits: int
) -> torch.Tensor:
    """Float32 `[out, in]` weights of MLX affine packed weights, as `mx.dequantize` computes them."""
    values = unpack_mlx(packed, bits)
    out_features, n_groups = scales.shape
    groups = values.float().view(out_features, n_groups, -1)  # [out, groups, group_size]
    return (groups * scales.float()[..., None] + biases.float()[..., None]).view(out_features, -1)
