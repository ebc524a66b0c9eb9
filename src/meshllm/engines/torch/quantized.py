"""MLX-quantized checkpoints in the PyTorch engine: the packed format, and dequantizing it.

mlx-lm's converter ("affine" mode) stores a quantized layer as three tensors next to each other:
`{prefix}.weight` `[out, in * bits / 32]` uint32, each word holding `32 / bits` values, the first in the
lowest bits (little-endian); `{prefix}.scales` and `{prefix}.biases` `[out, in / group_size]` in the
checkpoint's float dtype. A weight is `q * scale + bias` with the scale and bias of its group of
`group_size` consecutive inputs, which is what `mx.dequantize` computes.
"""

from __future__ import annotations

from typing import Any

import torch

from meshllm.errors import ConfigError

SUPPORTED_BITS = (2, 4, 8)  # widths that tile a byte; mlx's 3, 5 and 6 bits pack across bytes


def dequantize(packed: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor, bits: int) -> torch.Tensor:
    """Dense float32 `[out, in]` weights from packed `[out, in * bits / 32]` words, as `mx.dequantize`."""
    if bits not in SUPPORTED_BITS:
        raise ConfigError(f"{bits}-bit weights are not supported by the torch engine (supported: 2, 4, 8)")
    out_features = packed.shape[0]
    n_groups = scales.shape[-1]
    # Little-endian words: byte k of word j holds values 4j + k (8 bits), 8j + 2k, 8j + 2k + 1 (4 bits), ...
    as_bytes = packed.contiguous().view(torch.uint8).reshape(out_features, -1)  # [out, in * bits / 8]
    per_byte = 8 // bits
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8)  # [per_byte]
    in_features = as_bytes.shape[1] * per_byte
    if in_features % n_groups or scales.shape != biases.shape or scales.shape[0] != out_features:
        raise ConfigError(
            f"packed weights {tuple(packed.shape)} at {bits} bits do not match scales {tuple(scales.shape)}"
            f" and biases {tuple(biases.shape)}"
        )
    values = (as_bytes[..., None] >> shifts) & ((1 << bits) - 1)  # [out, in * bits / 8, per_byte]
    values = values.reshape(out_features, n_groups, -1).float()  # [out, groups, group_size]
    weight = values * scales.float()[..., None] + biases.float()[..., None]
    return weight.reshape(out_features, -1)


def quantized_prefixes(names: list[str]) -> list[str]:
    """Modules with packed weights: those with `{prefix}.scales` among `names`."""
    return [name.removesuffix(".scales") for name in names if name.endswith(".scales")]


def layer_bits(quantization: dict[str, Any], prefix: str) -> int:
    """The bit width of one layer: its own entry in the quantization config, else the default."""
    settings = quantization.get(prefix)
    if isinstance(settings, dict):
        if settings.get("mode", "affine") != "affine":
            raise ConfigError(
                f"{prefix}: quantization mode {settings['mode']!r} is not supported (affine only)"
            )
        return int(settings["bits"])
    return int(quantization["bits"])
