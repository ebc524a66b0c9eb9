"""`config.json` of a Llama-family checkpoint, parsed into one dataclass."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from meshllm.defaults import MODEL_TYPES
from meshllm.devices import LayerShape
from meshllm.errors import ConfigError


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    vocab_size: int
    num_key_value_heads: int = 0  # 0: same as num_attention_heads
    head_dim: int = 0  # 0: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # e.g. Llama 3's {"rope_type": "llama3", "factor": ...}
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v projections (always on for qwen2)
    qk_norm: bool = False  # RMSNorm on each head's q and k before RoPE (qwen3)
    sliding_window: int | None = None  # mistral: attend to at most this many previous positions
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    torch_dtype: str | None = None
    quantization: dict[str, Any] | None = None  # MLX-quantized checkpoints: {"group_size", "bits"}
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_dict(cls, config: dict[str, Any], source: str = "config.json") -> ModelConfig:
        model_type = config.get("model_type")
        if model_type not in MODEL_TYPES:
            raise ConfigError(
                f"{source}: model_type {model_type!r} is not supported (supported: {', '.join(MODEL_TYPES)})"
            )
        for key in (
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "vocab_size",
        ):
            value = config.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:  # bool is an int subclass
                raise ConfigError(f"{source}: {key} must be a positive integer, got {value!r}")

        # transformers 5 writes rope settings under rope_parameters; hub checkpoints mostly at the top level.
        rope: dict[str, Any] = dict(config.get("rope_parameters") or {})
        rope_theta = config.get("rope_theta", rope.get("rope_theta", 10000.0))
        rope_scaling = config.get("rope_scaling")
        if rope_scaling is None and rope.get("rope_type", "default") != "default":
            rope_scaling = {k: v for k, v in rope.items() if k != "rope_theta"}

        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in config.items() if k in known}
        values.update(
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            attention_bias=bool(config.get("attention_bias", False)) or model_type == "qwen2",
            qk_norm=model_type == "qwen3",
            sliding_window=config.get("sliding_window") if model_type == "mistral" else None,
            num_key_value_heads=config.get("num_key_value_heads") or config["num_attention_heads"],
            head_dim=config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"],
            torch_dtype=config.get("torch_dtype") or config.get("dtype"),  # transformers 5 writes "dtype"
            raw=config,
        )
        return cls(**values)

    @classmethod
    def from_file(cls, path: Path) -> ModelConfig:
        try:
            config = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(
                f"{path.parent}: no config.json (not a Hugging Face checkpoint folder)"
            ) from None
        except json.JSONDecodeError as error:
            raise ConfigError(f"{path}: not valid JSON ({error})") from None
        return cls.from_dict(config, source=str(path))

    def kv_bytes_per_token(self, layers: int, itemsize: int) -> int:
        """Keys and values of one token over `layers` layers, each element `itemsize` bytes."""
        return 2 * layers * self.num_key_value_heads * self.head_dim * itemsize

    def layer_shape(self, context: int) -> LayerShape:
        """A decoder layer of this model, to time one like it with `context` tokens cached per sequence."""
        return LayerShape(
            self.model_type,
            self.hidden_size,
            self.intermediate_size,
            self.num_attention_heads,
            self.num_key_value_heads,
            self.head_dim,
            context,
        )

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(self.eos_token_id)
