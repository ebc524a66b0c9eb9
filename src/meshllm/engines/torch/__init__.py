"""The PyTorch engine: Llama-family models (Llama, Mistral, Qwen2, Qwen3) run as pipeline stages."""

from meshllm.engines.torch.stage import TorchStage, load_stage

__all__ = ["TorchStage", "load_stage"]
