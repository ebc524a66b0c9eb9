"""Read the tensors of one stage from a checkpoint's safetensors files, by name, and nothing else."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch
from safetensors import safe_open

from meshllm.errors import ConfigError
from meshllm.models.checkpoint import Checkpoint


def stage_tensor_names(
    checkpoint: Checkpoint, layer_range: tuple[int, int], is_first: bool, is_last: bool
) -> dict[str, str]:
    """Checkpoint tensor name -> stage parameter name, for exactly the tensors this stage needs."""
    start, end = layer_range
    wanted: dict[str, str] = {}
    for name in checkpoint.weight_map:
        if name.startswith("model.layers."):
            index = int(name.split(".")[2])
            if start <= index < end:
                wanted[name] = name.removeprefix("model.")
        elif name.startswith("model.embed_tokens.") and is_first:
            wanted[name] = name.removeprefix("model.")
        elif name.startswith("model.norm.") and is_last:
            wanted[name] = name.removeprefix("model.")
        elif name.startswith("lm_head.") and is_last:
            wanted[name] = name
    if is_last and checkpoint.config.tie_word_embeddings:
        # Tied embeddings: the last stage reads the embedding matrix as its lm_head.
        for name in checkpoint.weight_map:
            if name.startswith("model.embed_tokens."):
                wanted[name] = wanted.get(name, name.removeprefix("model."))
    return wanted


def read_tensors(checkpoint: Checkpoint, names: list[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Read `names` (grouped by file, each file opened once), converted to `dtype` unless integer."""
    checkpoint.require(names)
    by_file: dict[Path, list[str]] = defaultdict(list)
    for name in names:
        by_file[checkpoint.weight_map[name]].append(name)
    tensors: dict[str, torch.Tensor] = {}
    for file, file_names in by_file.items():
        try:
            with safe_open(file, framework="pt") as handle:
                for name in file_names:
                    tensor = handle.get_tensor(name)
                    tensors[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
        except FileNotFoundError:
            raise ConfigError(f"{file}: listed in the checkpoint's index but missing") from None
    return tensors
