"""The rotary embedding's inverse frequencies, with a checkpoint's `rope_scaling`, for every engine."""

from __future__ import annotations

import math

import numpy as np

from meshllm.errors import ConfigError
from meshllm.models.config import ModelConfig


def inverse_frequencies(config: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    """(the default inverse frequencies, those with `rope_scaling` applied), float64 `[head_dim / 2]`."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    scaling = config.rope_scaling or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return inv_freq, inv_freq
    if rope_type == "linear":
        return inv_freq, inv_freq / scaling["factor"]
    if rope_type == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        original = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        lowered = np.where(wavelen > original / low, inv_freq / factor, inv_freq)
        smooth = (original / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * lowered / factor + smooth * lowered
        medium = (wavelen >= original / high) & (wavelen <= original / low)
        return inv_freq, np.where(medium, smoothed, lowered)
    raise ConfigError(
        f"config.json: rope_scaling type {rope_type!r} is not supported (default, linear, llama3)"
    )
