"""A ggml stage's KV caches in ggml buffers and its kept step graphs: decode steps reuse their graph,
caches grow past a chunk, restarts from an earlier position, sequences of different lengths in one step,
and release."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ggml")

from meshllm.engines import load_stage  # noqa: E402
from meshllm.engines.ggml.cache import CHUNK  # noqa: E402
from meshllm.errors import StageError  # noqa: E402
from meshllm.step import Segment  # noqa: E402
from tests.engines.stage_helpers import greedy_decode, make_prompt, pipeline_logits  # noqa: E402

F32_ATOL = 1e-4  # float32 ggml against float32 torch, as in test_ggml_stage.py
# the same float32 stage computing the same rows in another step: with llamafile's tiled mat-muls, a step
# of several rows sums in another order than a one-row step (seen: 1.0e-5 on logits of order 1); a stale or
# misplaced cache row is off by O(1)
SAME_ATOL = 1e-4


@pytest.fixture(scope="module")
def qwen3(tiny_checkpoint: Callable[..., Path]) -> Path:
    return tiny_checkpoint("qwen3")


def decode(stage, seq_id: int, start: int, tokens: list[int]) -> np.ndarray:
    """Logits of one-token decode steps of `tokens` from position `start`, `[len(tokens), vocab]`."""
    rows = [
        pipeline_logits([stage], [Segment(seq_id, start + i, 1, sample=True)], np.array([token]))[0]
        for i, token in enumerate(tokens)
    ]
    return np.stack(rows)


def test_decode_steps_reuse_one_graph(qwen3):
    stage = load_stage("ggml", qwen3, (0, 4))
    prompt = make_prompt(stage.config.vocab_size, 7)
    pipeline_logits([stage], [Segment(0, 0, len(prompt), sample=True)], prompt)
    decode(stage, 0, len(prompt), [5])
    built = stage.graphs.built
    decode(stage, 0, len(prompt) + 1, [6, 7, 8, 9])
    assert stage.graphs.built == built  # the same shape of step: the graph is set and computed again


def test_a_cache_growing_past_a_chunk_keeps_torch_logits(qwen3):
    """A prompt that ends just before a chunk's end, decoded past it: the cache moves to a larger buffer
    (and a new graph), and the logits stay torch's."""
    reference = load_stage("torch", qwen3, (0, 4))
    stage = load_stage("ggml", qwen3, (0, 4))
    prompt = make_prompt(stage.config.vocab_size, CHUNK - 3, seed=4)
    expected_tokens, expected_logits = greedy_decode([reference], prompt, 8)
    tokens, logits = greedy_decode([stage], prompt, 8)
    np.testing.assert_allclose(logits, expected_logits, atol=F32_ATOL, rtol=0)
    assert tokens == expected_tokens


@pytest.mark.parametrize("arch", ["qwen3", "mistral"])
def test_a_restart_from_an_earlier_position_equals_a_fresh_sequence(arch, tiny_checkpoint):
    """Rows after the restart position are overwritten or hidden: as if they had never been written."""
    stage = load_stage("ggml", tiny_checkpoint(arch), (0, 4))
    vocab = stage.config.vocab_size
    first, second = make_prompt(vocab, 12, seed=5), make_prompt(vocab, 12, seed=6)
    pipeline_logits([stage], [Segment(1, 0, 12, sample=True)], first)
    decode(stage, 1, 12, [3, 4, 5])  # the cache holds 15 positions
    restarted = pipeline_logits([stage], [Segment(1, 4, 8, sample=True)], second[4:])[0]
    then = decode(stage, 1, 12, [7, 8])
    fresh_prompt = np.concatenate([first[:4], second[4:]])
    fresh = pipeline_logits([stage], [Segment(2, 0, 12, sample=True)], fresh_prompt)[0]
    np.testing.assert_allclose(restarted, fresh, atol=SAME_ATOL, rtol=0)
    np.testing.assert_allclose(then, decode(stage, 2, 12, [7, 8]), atol=SAME_ATOL, rtol=0)


def test_sequences_of_different_lengths_in_one_step_equal_each_alone(qwen3):
    """Four sequences (one past a chunk) decode in one step, and one of them also prefills more: each
    row as when its sequence runs alone."""
    stage = load_stage("ggml", qwen3, (0, 4))
    vocab = stage.config.vocab_size
    lengths = [3, 9, 40, CHUNK + 20]
    prompts = [make_prompt(vocab, n, seed=10 + i) for i, n in enumerate(lengths)]
    for seq_id, prompt in enumerate(prompts):
        pipeline_logits([stage], [Segment(seq_id, 0, len(prompt) - 1, sample=True)], prompt[:-1])
    alone = [decode(stage, seq_id, len(p) - 1, [int(p[-1])])[0] for seq_id, p in enumerate(prompts)]
    segments = [Segment(seq_id, len(p) - 1, 1, sample=True) for seq_id, p in enumerate(prompts)]
    together = pipeline_logits([stage], segments, np.array([int(p[-1]) for p in prompts]))
    np.testing.assert_allclose(together, np.stack(alone), atol=SAME_ATOL, rtol=0)
    # a prefill of 5 more tokens of sequence 1 beside the others' decode
    extra = make_prompt(vocab, 5, seed=20)
    segments = [Segment(0, len(prompts[0]), 1, sample=True), Segment(1, len(prompts[1]), 5, sample=True)]
    mixed = pipeline_logits([stage], segments, np.concatenate([[4], extra]))
    stage.release([0, 1])
    for seq_id, prompt in enumerate(prompts[:2]):
        pipeline_logits([stage], [Segment(seq_id, 0, len(prompt), sample=True)], prompt)
    np.testing.assert_allclose(mixed[0], decode(stage, 0, len(prompts[0]), [4])[0], atol=SAME_ATOL, rtol=0)
    rows = pipeline_logits([stage], [Segment(1, len(prompts[1]), 5, sample=True)], extra)
    np.testing.assert_allclose(mixed[1], rows[0], atol=SAME_ATOL, rtol=0)


def test_release_frees_the_caches_and_their_graphs(qwen3):
    stage = load_stage("ggml", qwen3, (0, 4))
    prompt = make_prompt(stage.config.vocab_size, 6)
    for seq_id in (1, 2):
        pipeline_logits([stage], [Segment(seq_id, 0, 6, sample=True)], prompt)
        decode(stage, seq_id, 6, [3])
    assert stage.live_sequences() == 2 and len(stage.graphs.graphs) >= 2
    stage.release([1])
    assert stage.live_sequences() == 1
    assert all(part[0] != 1 for key in stage.graphs.graphs for part in key)
    with pytest.raises(StageError, match="position 7"):  # released: sequence 1 starts again at 0
        decode(stage, 1, 7, [3])
    again = pipeline_logits([stage], [Segment(1, 0, 6, sample=True)], prompt)
    kept = decode(stage, 2, 7, [4])  # sequence 2's cache untouched by the release
    stage.release([1, 2])
    assert stage.live_sequences() == 0 and not stage.graphs.graphs
    assert np.isfinite(again).all() and np.isfinite(kept).all()


def test_quantized_stages_hold_float16_caches(qwen3):
    """As llama.cpp: float16 keys and values beside q8_0 weights, half a float32 stage's cache bytes."""
    full = load_stage("ggml", qwen3, (0, 4))
    stage = load_stage("ggml", qwen3, (0, 4), quantize="int8")
    assert stage.kv_bytes_per_token() * 2 == full.kv_bytes_per_token()
    prompt = make_prompt(stage.config.vocab_size, 9)
    expected_tokens, expected_logits = greedy_decode([full], prompt, 6)
    tokens, logits = greedy_decode([stage], prompt, 6)
    assert min(np.corrcoef(a, b)[0, 1] for a, b in zip(logits, expected_logits, strict=True)) > 0.999
    assert tokens[0] == expected_tokens[0]
