"""Float checkpoints held quantized by the torch engine (`quantize="int8"|"int4"` at load): close to the
float stage, split-equivalent, and at about a half (int8) or a quarter (int4) of the bytes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from meshllm.engines.torch.qlinear import QuantizedLinear
from meshllm.engines.torch.stage import load_stage
from meshllm.errors import ConfigError
from meshllm.step import Segment
from tests.engines.stage_helpers import greedy_decode, make_prompt, pipeline_logits

# Close to the bfloat16 stage on every position of a prompt: the least cosine similarity of the logits,
# and how often the most likely token is the same. Measured on these tiny layers (64 inputs: a 4-bit
# group is the whole row): int8 cosine >= 0.9996 and top-1 0.875; int4 cosine >= 0.954 and top-1 0.67.
BOUNDS = {"int8": (0.999, 0.8), "int4": (0.95, 0.6)}


def prefix_logits(stage, prompt: np.ndarray) -> np.ndarray:
    segments = [Segment(seq_id=i, start_pos=0, n_tokens=i + 1, sample=True) for i in range(len(prompt))]
    token_ids = np.concatenate([prompt[: i + 1] for i in range(len(prompt))])
    return pipeline_logits([stage], segments, token_ids)


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_a_quantized_stage_keeps_the_float_stage_s_logits(arch, mode, tiny_checkpoint) -> None:
    path = tiny_checkpoint(arch)
    dense = load_stage(path, (0, 4), dtype="bfloat16")
    quantized = load_stage(path, (0, 4), dtype="bfloat16", quantize=mode)
    prompt = make_prompt(dense.config.vocab_size, 24, seed=5)
    expected, actual = prefix_logits(dense, prompt), prefix_logits(quantized, prompt)
    cosine = (expected * actual).sum(-1) / (
        np.linalg.norm(expected, axis=-1) * np.linalg.norm(actual, axis=-1)
    )
    agreement = float(np.mean(expected.argmax(-1) == actual.argmax(-1)))
    least_cosine, least_agreement = BOUNDS[mode]
    assert cosine.min() > least_cosine and agreement >= least_agreement, (cosine.min(), agreement)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_split_quantized_stages_equal_the_whole(mode, tiny_checkpoint) -> None:
    path = tiny_checkpoint("qwen3")
    whole = load_stage(path, (0, 4), dtype="bfloat16", quantize=mode)
    split = [load_stage(path, r, dtype="bfloat16", quantize=mode) for r in [(0, 1), (1, 3), (3, 4)]]
    prompt = make_prompt(whole.config.vocab_size, 7, seed=4)
    tokens, logits = greedy_decode(split, prompt, 6)
    expected_tokens, expected_logits = greedy_decode([whole], prompt, 6)
    np.testing.assert_allclose(logits, expected_logits, atol=1e-2, rtol=0)  # bfloat16 activations
    assert tokens == expected_tokens


@pytest.mark.parametrize(("mode", "most"), [("int8", 0.53), ("int4", 0.30)])
def test_a_quantized_stage_holds_a_fraction_of_the_bfloat16_bytes(mode, most, tiny_checkpoint) -> None:
    path = tiny_checkpoint("llama")  # untied: the middle layers and the lm_head are all linear layers
    dense = load_stage(path, (1, 4), dtype="bfloat16")
    quantized = load_stage(path, (1, 4), dtype="bfloat16", quantize=mode)
    norms = sum(p.numel() * p.element_size() for p in quantized.model.parameters())
    assert quantized.weight_bytes() - norms < most * (dense.weight_bytes() - norms)
    linears = [m for m in quantized.model.modules() if isinstance(m, QuantizedLinear)]
    assert len(linears) == 3 * 4 + 1  # qkv, o, gate_up, down in each of 3 layers, and the lm_head
    assert {m.mode for m in linears} == {mode}


def test_the_projections_are_fused_and_the_float_ones_dropped(tiny_checkpoint) -> None:
    stage = load_stage(tiny_checkpoint("qwen3"), (0, 2), dtype="bfloat16", quantize="int4")
    layer = stage.model.layers["0"]
    assert layer.self_attn.q_proj is None and layer.mlp.gate_proj is None
    assert layer.self_attn.qkv.sizes == [64, 32, 32]
    assert not any(
        p.dtype == torch.int8 or p.ndim == 2 and p.shape[0] == 64 and p.shape[1] == 64
        for p in stage.model.parameters()
        if p is not stage.model.embed_tokens.weight
    )


def test_a_group_size_that_does_not_divide_a_layer_is_refused_naming_it(tiny_checkpoint) -> None:
    with pytest.raises(ConfigError, match=r"model\.layers\.0\."):
        load_stage(tiny_checkpoint("qwen3"), (0, 1), dtype="bfloat16", quantize="int4", group_size=48)


def test_load_reports_progress_for_a_quantized_stage(tiny_checkpoint: Callable[..., Path]) -> None:
    fractions: list[float] = []
    load_stage(tiny_checkpoint("qwen3"), (0, 4), dtype="bfloat16", quantize="int8", progress=fractions.append)
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and len(fractions) > 4
