"""The MLX engine: pipeline stages on mlx-lm's own model classes (Apple silicon; a CPU build elsewhere)."""

from meshllm.engines.mlx.stage import MlxStage, load_stage

__all__ = ["MlxStage", "load_stage"]
