"""The layer plan: which device runs which half-open range of decoder layers.

By cost (`balance.py`): the split that makes the slowest stage's time per token least, each stage's bytes
read per token over its device's measured read speed, within each device's memory. A split that cannot fit
is reported naming every device that falls short (from the memory-weighted split, the fairest one).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from meshllm.errors import ConfigError
from meshllm.models.balance import ModelCosts, StageSeconds, balance
from meshllm.models.checkpoint import Checkpoint
from meshllm.step import LayerRange

_BYTES_PER_DTYPE = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "U32": 4,
    "I16": 2,
    "U8": 1,
    "I8": 1,
}
_TARGET_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
HEADROOM = 1.2  # weights plus a fifth for KV caches, activations and the runtime


@dataclass(frozen=True)
class StagePlan:
    device: str
    layer_range: LayerRange
    weight_bytes: int  # estimated, in the dtype the stage will run in


def plan_layers(num_layers: int, weights: list[float]) -> list[LayerRange]:
    """Split `num_layers` into contiguous `[start, end)` ranges proportional to `weights`, each non-empty."""
    if not weights:
        raise ConfigError("the plan needs at least one device")
    if num_layers < len(weights):
        raise ConfigError(f"the model has {num_layers} layers, fewer than the {len(weights)} devices")
    if any(w <= 0 for w in weights):
        raise ConfigError("every device needs memory greater than 0 for the plan")
    total = sum(weights)
    bounds, cumulative = [0], 0.0
    for index, weight in enumerate(weights[:-1]):
        cumulative += weight
        boundary = round(num_layers * cumulative / total)
        # at least one layer here, and leave at least one for every device still to come
        low, high = bounds[-1] + 1, num_layers - (len(weights) - 1 - index)
        bounds.append(min(max(boundary, low), high))
    bounds.append(num_layers)
    return [LayerRange(start, end) for start, end in zip(bounds[:-1], bounds[1:], strict=True)]


def tensor_bytes(checkpoint: Checkpoint, dtype: str | None = None) -> dict[str, int]:
    """Bytes of every tensor as stored (or as `dtype` for floating tensors), read from the file headers only."""
    return {name: size for name, (size, _) in _tensor_sizes(checkpoint, dtype).items()}


def _tensor_sizes(checkpoint: Checkpoint, dtype: str | None) -> dict[str, tuple[int, list[int]]]:
    """(bytes as stored or as `dtype`, shape) of every tensor, from the file headers."""
    sizes: dict[str, tuple[int, list[int]]] = {}
    if checkpoint.gguf is not None:  # held as stored, whatever the dtype
        return {
            name: (checkpoint.gguf.tensors[name].nbytes, list(checkpoint.gguf.tensors[name].shape))
            for name in checkpoint.gguf.weight_names
        }
    for file in sorted(set(checkpoint.weight_map.values())):
        for name, info in _header(file).items():
            if name == "__metadata__":
                continue
            count = 1
            for dim in info["shape"]:
                count *= dim
            stored = _BYTES_PER_DTYPE.get(info["dtype"], 4)
            is_float = info["dtype"] in ("F64", "F32", "F16", "BF16")
            sizes[name] = (
                count * (_TARGET_BYTES[dtype] if dtype and is_float else stored),
                list(info["shape"]),
            )
    return sizes


def quantized_bytes(shape: list[int], quantize: str, group_size: int, scale_bytes: int) -> int:
    """Bytes of an `[out, in]` weight held as `quantize`: int8 with a scale per row; int4 with a scale and a
    zero point per group of `group_size` inputs."""
    out_features, in_features = shape
    if quantize == "int8":
        return out_features * in_features + out_features * scale_bytes
    return out_features * in_features // 2 + out_features * (in_features // group_size) * 2 * scale_bytes


def _is_quantizable(name: str, shape: list[int]) -> bool:
    """The linear layers' weights (the embedding stays a table; a packed checkpoint is quantized already)."""
    return len(shape) == 2 and name.endswith("_proj.weight") or name == "lm_head.weight"


def _header(file: Path) -> dict:
    with open(file, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        return json.loads(handle.read(length))


def stage_weight_bytes(
    sizes: dict[str, int],
    checkpoint: Checkpoint,
    layer_range: tuple[int, int],
    quantized: dict[str, int] | None = None,  # bytes of the weights that are held quantized, by name
) -> int:
    config = checkpoint.config
    start, end = layer_range
    is_last = end == config.num_hidden_layers
    quantized = quantized or {}
    total = 0
    for name, size in sizes.items():
        held = quantized.get(name, size)
        if name.startswith("model.layers."):
            total += held if start <= int(name.split(".")[2]) < end else 0
        elif name.startswith("model.embed_tokens."):
            # A lookup table on the first stage; the lm_head (held like one) on the last when tied.
            lm_head = quantized.get("lm_head.weight", size) if name.endswith(".weight") else size
            total += size * (start == 0) + lm_head * (is_last and config.tie_word_embeddings)
        elif name.startswith(("model.norm.", "lm_head.")):
            total += held if is_last else 0
    return total


def model_costs(sizes: dict[str, int], checkpoint: Checkpoint, quantized: dict[str, int]) -> ModelCosts:
    """The bytes of each part of the model as a device holding `quantized` weights would hold them."""
    config = checkpoint.config
    layers = [0] * config.num_hidden_layers
    embedding = head = 0
    for name, size in sizes.items():
        held = quantized.get(name, size)
        if name.startswith("model.layers."):
            layers[int(name.split(".")[2])] += held
        elif name.startswith("model.embed_tokens."):
            embedding += size
            if config.tie_word_embeddings:
                head += quantized.get("lm_head.weight", size) if name.endswith(".weight") else size
        elif name.startswith(("model.norm.", "lm_head.")):
            head += held
    shared = config.tie_word_embeddings and "lm_head.weight" not in quantized
    return ModelCosts(layers, embedding, head, head_is_embedding=shared)


def model_weights(checkpoint: Checkpoint) -> ModelCosts:
    """Weight elements (multiply-adds per token) of each part of the model, in `ModelCosts`' shape; an
    MLX-packed weight counts the values its words hold."""
    bits = int((checkpoint.config.quantization or {}).get("bits", 32))
    counts = {}
    for name, (_, shape) in _tensor_sizes(checkpoint, None).items():
        if (
            name.endswith((".scales", ".biases"))
            and name.rsplit(".", 1)[0] + ".weight" in checkpoint.weight_map
        ):
            continue  # a packed weight's scales and biases: not multiply-adds
        packed = (
            name.endswith(".weight") and name.removesuffix(".weight") + ".scales" in checkpoint.weight_map
        )
        counts[name] = math.prod(shape) * (32 // bits if packed else 1)
    return model_costs(counts, checkpoint, {})


def quantized_sizes(
    checkpoint: Checkpoint, dtype: str, quantize: str | None, group_size: int
) -> dict[str, int]:
    """Bytes of each weight that `quantize` holds quantized (the lm_head under its own name even when tied)."""
    if quantize is None or checkpoint.config.quantization or checkpoint.gguf is not None:
        return {}  # a packed checkpoint, or a GGUF file, is counted as stored
    scale_bytes = _TARGET_BYTES[dtype]
    sizes = {}
    for name, (_, shape) in _tensor_sizes(checkpoint, dtype).items():
        if name == "model.embed_tokens.weight" and checkpoint.config.tie_word_embeddings:
            sizes["lm_head.weight"] = quantized_bytes(shape, quantize, group_size, scale_bytes)
        elif _is_quantizable(name, shape):
            sizes[name] = quantized_bytes(shape, quantize, group_size, scale_bytes)
    return sizes


def make_plan(
    checkpoint: Checkpoint,
    devices: list[tuple[str, int]],  # (name, bytes of memory available), in chain order
    dtype: str = "float32",
    layer_overrides: dict[str, tuple[int, int]] | None = None,
    quantize: dict[str, str | None] | None = None,  # by device name: int8 | int4 | None (as stored)
    group_size: int = 64,
    speeds: dict[str, float] | None = None,  # by device name: measured read speed; None or 0: all alike
    stage_seconds: StageSeconds | None = None,  # a stage's time at speed 1 (None: bytes read a token)
) -> list[StagePlan]:
    """Ranges by cost within memory; raises ConfigError naming the devices and the shortfall if it can't fit.
    The cost is each stage's bytes read per decode token, or `stage_seconds` (`predict.step_balance`)."""
    config = checkpoint.config
    sizes = tensor_bytes(checkpoint, dtype)
    modes = {mode for mode in (quantize or {}).values() if mode}
    held = {mode: quantized_sizes(checkpoint, dtype, mode, group_size) for mode in modes}
    ranges: list[LayerRange] | None = None
    if layer_overrides:
        ranges = [LayerRange.checked(layer_overrides[name], config.num_hidden_layers) for name, _ in devices]
    elif len(devices) <= config.num_hidden_layers:
        known = [speed for speed in (speeds or {}).values() if speed > 0]
        ranges = balance(
            [
                model_costs(sizes, checkpoint, held.get((quantize or {}).get(name) or "", {}))
                for name, _ in devices
            ],
            [(speeds or {}).get(name, 0) or 1.0 for name, _ in devices]
            if len(known) == len(devices)
            else [1.0] * len(devices),
            [float(memory) for _, memory in devices],
            HEADROOM,
            stage_seconds,
        )
    if ranges is None:  # nothing fits (reported below, on the memory-weighted split), or too few layers
        ranges = plan_layers(config.num_hidden_layers, [float(memory) for _, memory in devices])
    plan = [
        StagePlan(
            name,
            layer_range,
            stage_weight_bytes(sizes, checkpoint, layer_range, held.get((quantize or {}).get(name) or "")),
        )
        for (name, _), layer_range in zip(devices, ranges, strict=True)
    ]
    short = [
        (stage, memory)
        for stage, (_, memory) in zip(plan, devices, strict=True)
        if stage.weight_bytes * HEADROOM > memory
    ]
    if short:
        needed = sum(stage.weight_bytes for stage in plan) * HEADROOM
        offered = sum(memory for _, memory in devices)
        details = ", ".join(
            f"{stage.device} needs {stage.weight_bytes * HEADROOM / 1e9:.2f} GB for layers "
            f"[{stage.layer_range[0]}, {stage.layer_range[1]}) but has {memory / 1e9:.2f} GB"
            for stage, memory in short
        )
        missing = max(needed - offered, max(s.weight_bytes * HEADROOM - m for s, m in short))
        raise ConfigError(
            f"the model does not fit: {details}; about {missing / 1e9:.2f} GB missing "
            f"(add a device, use a smaller dtype or a quantized checkpoint)"
        )
    return plan
