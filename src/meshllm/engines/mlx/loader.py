"""Build layers `[start, end)` of a checkpoint on mlx-lm's own model classes, reading only their tensors.

The whole mlx-lm model is constructed (its parameters are lazy, so this allocates nothing), every part
outside the stage is dropped, and only then are the checkpoint's tensors attached: `mx.load` is lazy too,
so tensors of other layers are never read from disk. Parameter names stay the checkpoint's, with global
layer indices (`model.layers.{i}.…`); the dropped layers are empty placeholders in the layer list.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, cast

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from meshllm.errors import ConfigError
from meshllm.models.checkpoint import Checkpoint
from meshllm.models.config import ModelConfig


def normalised_config(config: ModelConfig) -> dict[str, Any]:
    """`config.json` as mlx-lm should read it: the fields it would miss or default differently, resolved.

    mlx-lm 0.32 reads `rope_theta` only at the top level (transformers 5 nests it in `rope_parameters`) and
    defaults `tie_word_embeddings` to True for Llama, where Hugging Face defaults it to False.
    """
    normalised = {k: v for k, v in config.raw.items() if k != "rope_parameters"}
    normalised.update(
        rope_theta=config.rope_theta,
        rope_scaling=config.rope_scaling,
        head_dim=config.head_dim,
        num_key_value_heads=config.num_key_value_heads,
        tie_word_embeddings=config.tie_word_embeddings,
        rms_norm_eps=config.rms_norm_eps,
        max_position_embeddings=config.max_position_embeddings,
    )
    return normalised


def flat_parameters(model: nn.Module) -> list[tuple[str, mx.array]]:
    """`model`'s parameters as `(dotted name, array)` pairs."""
    # without a `destination`, tree_flatten returns a list (its annotation also allows a dict)
    return cast(list[tuple[str, mx.array]], tree_flatten(model.parameters()))


def model_classes(model_type: str) -> tuple[Callable[[Any], nn.Module], type[Any]]:
    """mlx-lm's `Model` and `ModelArgs` for `model_type`, found the way mlx-lm finds them."""
    from mlx_lm.utils import MODEL_REMAPPING

    name = MODEL_REMAPPING.get(model_type, model_type)
    try:
        module = importlib.import_module(f"mlx_lm.models.{name}")
    except ImportError:
        raise ConfigError(f"model_type {model_type!r} has no mlx-lm model (mlx_lm.models.{name})") from None
    return module.Model, module.ModelArgs


def keep_stage_parts(
    model: nn.Module, layer_range: tuple[int, int], is_first: bool, is_last: bool, tied: bool
) -> None:
    """Drop every part of `model` that layers `[start, end)` do not use (in place)."""
    start, end = layer_range
    inner = model.model
    for index in range(len(inner.layers)):
        if not start <= index < end:
            inner.layers[index] = nn.Module()  # an empty placeholder keeps the global indices
    if not (is_first or (is_last and tied)):  # tied: the last stage projects with the embedding matrix
        inner.embed_tokens = None
    if not is_last:
        inner.norm = None
        if "lm_head" in model:
            model.lm_head = None


def check_block_structure(model: nn.Module, layer_range: tuple[int, int]) -> None:
    """Steps run mlx-lm's decoder blocks part by part (see MlxStage); refuse a block not built that way."""
    block = model.model.layers[layer_range[0]]
    parts = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")
    missing = [part for part in parts if part not in block]
    if missing:
        raise ConfigError(f"mlx-lm's {type(block).__module__} block has no {', '.join(missing)}")


def read_weights(checkpoint: Checkpoint, model: nn.Module) -> dict[str, mx.array]:
    """The checkpoint's tensors of the modules `model` still has, as lazy arrays; nothing else is read."""
    kept_modules = {name.rpartition(".")[0] for name, _ in flat_parameters(model)}
    by_file: dict[str, list[str]] = {}
    for name, file in checkpoint.weight_map.items():
        if name.rpartition(".")[0] in kept_modules:  # includes `.scales` / `.biases` of packed weights
            by_file.setdefault(str(file), []).append(name)
    weights: dict[str, mx.array] = {}
    for file_name, names in by_file.items():
        try:
            # lazy: a tensor is read from disk only when evaluated; a safetensors file loads as a dict
            arrays = cast(dict[str, mx.array], mx.load(file_name))
        except (OSError, RuntimeError, ValueError) as error:
            raise ConfigError(f"{file_name}: cannot read ({error})") from None
        weights.update({name: arrays[name] for name in names})
    return model.sanitize(weights) if hasattr(model, "sanitize") else weights


def quantize_like_checkpoint(
    model: nn.Module, quantization: dict[str, Any], weights: dict[str, mx.array]
) -> None:
    """Swap in quantized layers where the checkpoint has packed weights, as mlx-lm's own loader does."""
    from mlx_lm.utils import infer_quant_config

    def class_predicate(path: str, module: nn.Module) -> bool | dict[str, Any]:
        if path in quantization:  # per-layer settings written by mlx-lm's converter
            return quantization[path]
        if not hasattr(module, "to_quantized") or f"{path}.scales" not in weights:
            return False
        return infer_quant_config(path, module, weights)

    nn.quantize(
        model,
        group_size=quantization["group_size"],
        bits=quantization["bits"],
        mode=quantization.get("mode", "affine"),
        class_predicate=class_predicate,
    )


def evaluate_all(model: nn.Module) -> None:
    """Evaluate every array of `model`, private ones too (e.g. a RoPE's precomputed frequencies).

    MLX streams are per thread: a lazy array left from loading could not be evaluated by the thread that
    later runs the steps.
    """
    arrays = [
        value
        for _, module in model.named_modules()
        for value in module.values()
        if isinstance(value, mx.array)
    ]
    mx.eval(model.parameters(), arrays)


def build_stage_model(
    checkpoint: Checkpoint,
    layer_range: tuple[int, int],
    is_first: bool,
    is_last: bool,
    dtype: mx.Dtype,
    progress: Callable[[float], None] | None = None,
    quantize: str | None = None,
    group_size: int = 64,
) -> nn.Module:
    """mlx-lm's model of `checkpoint` holding only what layers `[start, end)` need, weights evaluated."""
    config = checkpoint.config
    model_class, args_class = model_classes(config.model_type)
    try:
        model = model_class(args_class.from_dict(normalised_config(config)))
    except (TypeError, ValueError) as error:
        raise ConfigError(
            f"{checkpoint.path / 'config.json'}: mlx-lm cannot build the model ({error})"
        ) from None
    keep_stage_parts(model, layer_range, is_first, is_last, config.tie_word_embeddings)
    check_block_structure(model, layer_range)
    weights = read_weights(checkpoint, model)
    if progress is not None:
        progress(0.5)  # read (lazily mapped): evaluating them is the other half
    if config.quantization:
        quantize_like_checkpoint(model, config.quantization, weights)
    model.eval()
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as error:
        raise ConfigError(
            f"{checkpoint.path}: the checkpoint's tensors do not fit the model ({error})"
        ) from None
    model.set_dtype(dtype)  # floating parameters only; packed integer weights stay as they are
    if quantize is not None:
        _quantize_dense_layers(model, quantize, group_size)
    evaluate_all(model)
    if progress is not None:
        progress(1.0)
    return model


def _quantize_dense_layers(model: nn.Module, mode: str, group_size: int) -> None:
    """MLX's own affine quantization of every linear layer still dense (and the lm_head); embeddings stay."""
    bits = {"int8": 8, "int4": 4}[mode]

    def class_predicate(path: str, module: nn.Module) -> bool:
        if not isinstance(module, nn.Linear):  # already quantized ones are QuantizedLinear
            return False
        if module.weight.shape[-1] % group_size:
            raise ConfigError(
                f"{path}: {module.weight.shape[-1]} inputs are not a multiple of the group size {group_size}"
            )
        return True

    nn.quantize(model, group_size=group_size, bits=bits, class_predicate=class_predicate)
