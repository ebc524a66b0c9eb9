"""Loading a stage whose linear layers are held quantized: int8 or int4 asked at load, or the packed
weights of an MLX-quantized checkpoint (4 bits onto the int4 kernel as they are, 8 bits requantized).

One layer at a time: its tensors are read, its projections fused and quantized on the target device, and
the float copies dropped before the next layer is read, so the peak memory is the quantized stage plus
one float layer. The embedding stays a float table (a lookup reads one row a token); the lm_head, a full
matmul every token, is quantized like the layers (for tied embeddings, a quantized copy of the table).
"""

from __future__ import annotations

import torch
from torch import nn

from meshllm.engines.base import Progress
from meshllm.engines.torch.llama import Attention, DecoderLayer, FeedForward, StageModel
from meshllm.engines.torch.qlinear import make_linear, mlx_linear
from meshllm.engines.torch.quantized import dequantize, layer_bits, quantized_prefixes
from meshllm.engines.torch.weights import read_tensors
from meshllm.errors import ConfigError
from meshllm.models.checkpoint import Checkpoint

# The projections that run as one matmul, and the attribute the fused module takes.
FUSED = {"self_attn": (("q_proj", "k_proj", "v_proj"), "qkv"), "mlp": (("gate_proj", "up_proj"), "gate_up")}
SINGLE = {"self_attn": "o_proj", "mlp": "down_proj"}


class SplitLinear(nn.Module):
    """One (quantized) linear layer over several projections' rows, its output split back into them."""

    def __init__(self, linear: nn.Module, sizes: list[int]):
        super().__init__()
        self.linear = linear
        self.sizes = sizes

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.linear(x).split(self.sizes, dim=-1)


class _Reader:
    """The tensors of one group of names: dense ones in the stage's dtype, MLX-packed ones as packed."""

    def __init__(self, checkpoint: Checkpoint, names: list[str], dtype: torch.dtype):
        self.checkpoint = checkpoint
        self.quantization = checkpoint.config.quantization or {}
        mode = self.quantization.get("mode", "affine")
        if mode != "affine":
            raise ConfigError(
                f"{checkpoint.path}: quantization mode {mode!r} is not supported by the torch engine (affine only)"
            )
        self.packed = set(quantized_prefixes(names)) if self.quantization else set()
        packed_names = {f"{p}.{part}" for p in self.packed for part in ("weight", "scales", "biases")}
        self.dense = read_tensors(checkpoint, [n for n in names if n not in packed_names], dtype)
        # Scales and biases in float32: rounding them to a 16-bit dtype first would add error.
        self.raw = read_tensors(checkpoint, sorted(packed_names), torch.float32)
        self.dtype = dtype

    def group_size(self, prefix: str) -> int:
        settings = self.quantization.get(prefix)
        return int(settings["group_size"] if isinstance(settings, dict) else self.quantization["group_size"])

    def float_weight(self, prefix: str) -> torch.Tensor:
        """The weight of `prefix` as dense floats (dequantized when packed)."""
        if prefix in self.packed:
            packed, scales, biases = (self.raw[f"{prefix}.{part}"] for part in ("weight", "scales", "biases"))
            return dequantize(packed, scales, biases, layer_bits(self.quantization, prefix)).to(self.dtype)
        return self.dense.pop(f"{prefix}.weight")

    def linear(
        self, prefixes: list[str], quantize: str | None, group_size: int, device: torch.device, name: str
    ) -> nn.Module:
        """One linear layer over the rows of `prefixes`' weights, in order."""
        biases = [self.dense.pop(f"{prefix}.bias", None) for prefix in prefixes]
        if any(b is None for b in biases) and not all(b is None for b in biases):
            raise ConfigError(f"{name}: a fused projection needs a bias on every part or on none")
        bias = None if biases[0] is None else torch.cat([b for b in biases if b is not None])
        settings = {
            (layer_bits(self.quantization, p), self.group_size(p)) for p in prefixes if p in self.packed
        }
        if len(settings) == 1 and all(prefix in self.packed for prefix in prefixes):
            (bits, packed_group) = settings.pop()
            packed, scales, raw_biases = (
                torch.cat([self.raw[f"{prefix}.{part}"] for prefix in prefixes])
                for part in ("weight", "scales", "biases")
            )
            return mlx_linear(packed, scales, raw_biases, bits, packed_group, bias, self.dtype, device, name)
        weight = torch.cat([self.float_weight(prefix) for prefix in prefixes])
        return make_linear(weight, bias, quantize, group_size, self.dtype, device, name)


def load_quantized(
    model: StageModel,
    checkpoint: Checkpoint,
    names: dict[str, str],  # checkpoint name -> stage parameter name
    groups: list[list[str]],  # the names a layer (or module) at a time
    dtype: torch.dtype,
    device: torch.device,
    quantize: str | None,
    group_size: int,
    progress: Progress | None,
) -> None:
    """Fill `model` (built on the meta device) group by group; its linear layers quantized on `device`."""
    config = checkpoint.config
    tied_lm_head = model.lm_head is not None and config.tie_word_embeddings
    for index, group in enumerate(groups):
        reader = _Reader(checkpoint, group, dtype)
        first = group[0]
        if first.startswith("model.layers."):
            layer = model.layers[first.split(".")[2]]
            assert isinstance(layer, DecoderLayer)
            prefix = ".".join(first.split(".")[:3])
            parts: list[tuple[str, Attention | FeedForward]] = [
                ("self_attn", layer.self_attn),
                ("mlp", layer.mlp),
            ]
            for part, module in parts:
                _fill_projections(module, part, f"{prefix}.{part}", reader, quantize, group_size, device)
        elif first.startswith("model.embed_tokens."):
            table = reader.float_weight("model.embed_tokens")
            if tied_lm_head:
                model.lm_head = _lm_head(reader, "model.embed_tokens", table, quantize, group_size, device)
            if model.embed_tokens is not None:
                model.embed_tokens.weight = nn.Parameter(table.to(device), requires_grad=False)
        elif first.startswith("lm_head."):
            if not tied_lm_head:
                model.lm_head = _lm_head(reader, "lm_head", None, quantize, group_size, device)
            reader.dense.pop("lm_head.weight", None)
        # What is left is float (the norms): assigned as it is.
        rest = {names[name]: tensor.to(device) for name, tensor in reader.dense.items() if name in names}
        model.load_state_dict(rest, strict=False, assign=True)
        if progress is not None:
            progress((index + 1) / len(groups))
    model.inv_freq = model.inv_freq.to(device)
    missing = [name for name, parameter in model.named_parameters() if parameter.is_meta]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise ConfigError(
            f"{checkpoint.path}: tensor 'model.{missing[0]}'{more} missing from the checkpoint's safetensors files"
        )


def _fill_projections(
    module: Attention | FeedForward,
    part: str,
    prefix: str,  # "model.layers.3.self_attn"
    reader: _Reader,
    quantize: str | None,
    group_size: int,
    device: torch.device,
) -> None:
    fused, attribute = FUSED[part]
    parts = [f"{prefix}.{name}" for name in fused]
    missing = [p for p in parts if f"{p}.weight" not in reader.dense and p not in reader.packed]
    if missing:
        raise ConfigError(
            f"{reader.checkpoint.path}: tensor '{missing[0]}.weight' missing from the checkpoint"
        )
    sizes = [_rows(reader, p) for p in parts]
    linear = reader.linear(parts, quantize, group_size, device, f"{prefix}.{attribute}")
    setattr(module, attribute, SplitLinear(linear, sizes))
    for name in fused:  # the separate projections are not needed any more
        setattr(module, name, None)
    single = f"{prefix}.{SINGLE[part]}"
    setattr(module, SINGLE[part], reader.linear([single], quantize, group_size, device, single))


def _rows(reader: _Reader, prefix: str) -> int:
    if prefix in reader.packed:
        return int(reader.raw[f"{prefix}.weight"].shape[0])
    return int(reader.dense[f"{prefix}.weight"].shape[0])


def _lm_head(
    reader: _Reader,
    prefix: str,
    table: torch.Tensor | None,
    quantize: str | None,
    group_size: int,
    device: torch.device,
) -> nn.Module:
    """The lm_head: the packed matrix as it is, else the float one quantized as asked."""
    if prefix in reader.packed:
        return reader.linear([prefix], quantize, group_size, device, "lm_head")
    weight = table if table is not None else reader.float_weight(prefix)
    return make_linear(weight, None, quantize, group_size, reader.dtype, device, "lm_head")
