"""Driving stages by hand in the engine tests: prompts, one step through a chain of stages, greedy decoding."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from meshllm.step import Segment, StepInput


def make_prompt(vocab_size: int, length: int, seed: int = 0) -> np.ndarray:
    # Ids from 3 up: no special tokens (0-2) in the prompt.
    return np.random.default_rng(seed).integers(3, vocab_size, size=length).astype(np.int64)


def pipeline_logits(stages: list[Any], segments: list[Segment], token_ids: np.ndarray) -> np.ndarray:
    """Run one step through `stages` in order, each stage's hidden states the next one's input."""
    hidden_states = None
    for stage in stages:
        step = StepInput(
            step_id=0,
            segments=segments,
            token_ids=np.asarray(token_ids, dtype=np.int64) if stage.is_first else None,
            hidden_states=hidden_states,
        )
        output = stage.forward(step)
        hidden_states = output.hidden_states
    assert output.logits is not None
    return output.logits


def greedy_decode(stages: list[Any], prompt: np.ndarray, n_tokens: int) -> tuple[list[int], np.ndarray]:
    """Greedy tokens and the logits each was taken from, `[n_tokens, vocab]`, one decode token per step."""
    rows = [pipeline_logits(stages, [Segment(0, 0, len(prompt), sample=True)], prompt)[0]]
    tokens = [int(rows[-1].argmax())]
    while len(tokens) < n_tokens:
        segment = Segment(0, len(prompt) + len(tokens) - 1, 1, sample=True)
        rows.append(pipeline_logits(stages, [segment], np.array(tokens[-1:]))[0])
        tokens.append(int(rows[-1].argmax()))
    for stage in stages:
        stage.release([0])
    return tokens, np.stack(rows)


def mlx_lm_greedy(path: Path, prompt: np.ndarray, n_tokens: int) -> tuple[list[int], np.ndarray]:
    """The same greedy decoding on mlx-lm's own loader and full model: the reference for the MLX engine."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.utils import load_model

    model, _ = load_model(Path(path))
    cache = make_prompt_cache(model)
    rows = [np.array(model(mx.array(prompt)[None], cache=cache)[0, -1])]
    tokens = [int(rows[-1].argmax())]
    while len(tokens) < n_tokens:
        rows.append(np.array(model(mx.array([tokens[-1:]]), cache=cache)[0, -1]))
        tokens.append(int(rows[-1].argmax()))
    return tokens, np.stack(rows)
