"""Tokenizer and chat template, through transformers' AutoTokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from meshllm.errors import ConfigError


def load_tokenizer(path: Path) -> Any:
    """The tokenizer of a checkpoint folder, or of a GGUF file (its `tokenizer.ggml.*` vocabulary and chat
    template, `gguf_tokenizer`)."""
    from transformers import AutoTokenizer

    from meshllm.models.gguf import GgufModel, gguf_tokenizer, is_gguf

    try:
        if is_gguf(path):
            return gguf_tokenizer(GgufModel(path))
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as error:
        raise ConfigError(f"{path}: could not load the tokenizer ({str(error).splitlines()[0]})") from None


def chat_prompt_ids(
    tokenizer: Any, messages: list[dict[str, Any]], template_kwargs: dict[str, Any] | None = None
) -> list[int]:
    """Token ids of `messages` rendered by the checkpoint's chat template, ready for the reply."""
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, **(template_kwargs or {})
    )
    return tokenizer.encode(text, add_special_tokens=False)
