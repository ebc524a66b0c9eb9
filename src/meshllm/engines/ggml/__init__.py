"""The ggml engine: pipeline stages as ggml graphs on the CPU, through the `ggml-python` bindings."""

from meshllm.engines.ggml.stage import GgmlStage, load_stage

__all__ = ["GgmlStage", "load_stage"]
