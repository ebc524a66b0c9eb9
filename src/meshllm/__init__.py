"""meshllm: one model, several machines, one OpenAI-compatible API."""

__version__ = "0.1.0"
