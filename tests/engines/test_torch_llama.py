"""The PyTorch Llama family computes what transformers computes, on tiny random-weight checkpoints."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from meshllm.engines.torch.stage import TorchStage, load_stage
from meshllm.models.tiny import ARCHS
from meshllm.step import Segment, StepInput

PROMPT_LENGTH = 20
NEW_TOKENS = 32


@dataclass
class Reference:
    """One tiny checkpoint, transformers' model of it, and a prompt for both."""

    path: Path
    model: torch.nn.Module
    prompt: np.ndarray  # [PROMPT_LENGTH] int64

    def logits(self, token_ids: np.ndarray) -> np.ndarray:
        """transformers' logits at every position of `token_ids`, [T, vocab]."""
        with torch.no_grad():
            return self.model(torch.as_tensor(token_ids)[None]).logits[0].float().numpy()


def make_prompt(vocab_size: int, length: int = PROMPT_LENGTH, seed: int = 0) -> np.ndarray:
    # Ids from 3 up: no special tokens (0-2) in the prompt.
    return np.random.default_rng(seed).integers(3, vocab_size, size=length).astype(np.int64)


def load_reference(path: Path) -> Reference:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return Reference(path, model, make_prompt(model.config.vocab_size))


@pytest.fixture(scope="module", params=ARCHS)
def reference(request: pytest.FixtureRequest, tiny_checkpoint: Callable[..., Path]) -> Reference:
    return load_reference(tiny_checkpoint(arch=request.param))


def forward_logits(stage: TorchStage, segments: list[Segment], token_ids: np.ndarray) -> np.ndarray:
    step = StepInput(step_id=0, segments=segments, token_ids=np.asarray(token_ids, dtype=np.int64))
    return stage.forward(step).logits


def prefix_logits(stage: TorchStage, prompt: np.ndarray) -> np.ndarray:
    """Logits at every position of `prompt` in one step: sequence i is the prompt's first i + 1 tokens."""
    segments = [Segment(seq_id=i, start_pos=0, n_tokens=i + 1, sample=True) for i in range(len(prompt))]
    logits = forward_logits(stage, segments, np.concatenate([prompt[: i + 1] for i in range(len(prompt))]))
    stage.release([segment.seq_id for segment in segments])
    return logits


def greedy_tokens(stage: TorchStage, prompt: np.ndarray, n_tokens: int) -> list[int]:
    """Prefill `prompt`, then decode one token per step, always taking the most likely one."""
    logits = forward_logits(stage, [Segment(0, 0, len(prompt), sample=True)], prompt)
    tokens = [int(logits[0].argmax())]
    while len(tokens) < n_tokens:
        position = len(prompt) + len(tokens) - 1
        logits = forward_logits(stage, [Segment(0, position, 1, sample=True)], np.array(tokens[-1:]))
        tokens.append(int(logits[0].argmax()))
    stage.release([0])
    return tokens


def test_prompt_logits_match_transformers_at_every_position(reference: Reference) -> None:
    stage = load_stage(reference.path, (0, 4))

    ours = prefix_logits(stage, reference.prompt)

    np.testing.assert_allclose(ours, reference.logits(reference.prompt), rtol=0, atol=1e-4)


def test_decode_logits_match_transformers_at_every_position(reference: Reference) -> None:
    stage = load_stage(reference.path, (0, 4))
    prompt, prefill = reference.prompt, 8

    rows = [forward_logits(stage, [Segment(0, 0, prefill, sample=True)], prompt[:prefill])[0]]
    for position in range(prefill, len(prompt)):
        segment = Segment(0, position, 1, sample=True)
        rows.append(forward_logits(stage, [segment], prompt[position : position + 1])[0])

    np.testing.assert_allclose(np.stack(rows), reference.logits(prompt)[prefill - 1 :], rtol=0, atol=1e-4)


def test_greedy_tokens_match_transformers_generate(reference: Reference) -> None:
    stage = load_stage(reference.path, (0, 4))
    prompt = torch.as_tensor(reference.prompt)[None]
    with torch.no_grad():
        generated = reference.model.generate(
            prompt, do_sample=False, max_new_tokens=NEW_TOKENS, eos_token_id=None, pad_token_id=0
        )
    expected = generated[0, PROMPT_LENGTH:].tolist()
    assert len(expected) == NEW_TOKENS  # transformers did not stop at an eos token

    assert greedy_tokens(stage, reference.prompt, NEW_TOKENS) == expected


def test_mistral_sliding_window_matches_transformers(
    tiny_checkpoint: Callable[..., Path], tmp_path: Path
) -> None:
    path = shutil.copytree(tiny_checkpoint(arch="mistral"), tmp_path / "windowed")
    config = json.loads((path / "config.json").read_text())
    config["sliding_window"] = 6  # shorter than the prompt, so the window cuts in
    (path / "config.json").write_text(json.dumps(config))
    windowed = load_reference(path)
    stage = load_stage(path, (0, 4))

    ours = prefix_logits(stage, windowed.prompt)

    np.testing.assert_allclose(ours, windowed.logits(windowed.prompt), rtol=0, atol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_bfloat16_logits_are_close_to_float32(arch: str, tiny_checkpoint: Callable[..., Path]) -> None:
    path = tiny_checkpoint(arch=arch)
    full, half = load_stage(path, (0, 4)), load_stage(path, (0, 4), dtype="bfloat16")
    assert next(half.model.parameters()).dtype == torch.bfloat16
    prompt = make_prompt(full.config.vocab_size)
    segments = [Segment(0, 0, len(prompt), sample=True)]

    expected = forward_logits(full, segments, prompt)[0]
    logits = forward_logits(half, segments, prompt)[0]

    assert logits.dtype == np.float32
    assert np.abs(logits - expected).max() < 0.05 * np.abs(expected).max()
    assert logits.argmax() == expected.argmax()


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_sharded_checkpoint_gives_the_same_logits_as_unsharded(
    arch: str, tiny_checkpoint: Callable[..., Path]
) -> None:
    sharded_path = tiny_checkpoint(arch=arch, shards=3)
    assert (sharded_path / "model.safetensors.index.json").exists()
    assert len(list(sharded_path.glob("*.safetensors"))) == 3
    whole, sharded = load_stage(tiny_checkpoint(arch=arch), (0, 4)), load_stage(sharded_path, (0, 4))
    prompt = make_prompt(whole.config.vocab_size)

    np.testing.assert_array_equal(prefix_logits(sharded, prompt), prefix_logits(whole, prompt))
