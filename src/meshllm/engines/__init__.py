"""Engines run a stage's layers. `load_stage` picks one by name; each lives in its own sub-package."""

from __future__ import annotations

import importlib
import platform
import sys
from typing import Any

from meshllm.engines.base import Stage
from meshllm.errors import ConfigError

ENGINES = ("torch", "mlx")


def default_engine() -> str:
    """mlx on Apple silicon, torch elsewhere."""
    if sys.platform == "darwin" and platform.machine() == "arm64":
        try:
            importlib.import_module("mlx.core")
            return "mlx"
        except ImportError:
            pass
    return "torch"


def load_stage(engine: str, checkpoint: Any, layer_range: tuple[int, int], **options: Any) -> Stage:
    """Load layers `[start, end)` of `checkpoint` on `engine` ('torch' or 'mlx')."""
    if engine not in ENGINES:
        raise ConfigError(f"engine {engine!r} is not one of {', '.join(ENGINES)}")
    try:
        module = importlib.import_module(f"meshllm.engines.{engine}")
    except ImportError as error:
        raise ConfigError(
            f"engine {engine!r} is not installed here ({error}); pip install 'meshllm[{engine}]'"
        ) from None
    return module.load_stage(checkpoint, layer_range, **options)
