"""MLX-quantized checkpoints in the PyTorch engine: packed weights are dequantized at load time."""

from __future__ import annotations

from collections.abc import Callable

import torch

from meshllm.models.checkpoint import Checkpoint


def dequantize_stage_tensors(
    checkpoint: Checkpoint,
    names: list[str],
    dtype: torch.dtype,
    read: Callable[[Checkpoint, list[str], torch.dtype], dict[str, torch.Tensor]],
) -> dict[str, torch.Tensor]:
    """Read `names`; for a quantized checkpoint, turn packed weights into `dtype` weights."""
    return read(checkpoint, names, dtype)
