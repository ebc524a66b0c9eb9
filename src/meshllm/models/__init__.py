"""Checkpoints: where a model's files are, what its config says, its tokenizer, and the layer plan."""

from meshllm.models.checkpoint import Checkpoint, resolve_model
from meshllm.models.config import ModelConfig

__all__ = ["Checkpoint", "ModelConfig", "resolve_model"]
