"""A PyTorch stage: split equivalence, mixed steps, loading only its own tensors, and its KV caches."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open

from meshllm.engines.torch import weights
from meshllm.engines.torch.stage import TorchStage, load_stage
from meshllm.errors import StageError
from meshllm.models.checkpoint import Checkpoint
from meshllm.models.tiny import ARCHS
from meshllm.step import Segment
from tests.engines.stage_helpers import greedy_decode, make_prompt, pipeline_logits

SPLITS = {
    "2 stages": [(0, 2), (2, 4)],
    "3 stages": [(0, 1), (1, 3), (3, 4)],
}


def checkpoint_tensor_bytes(path: Path, names: set[str]) -> int:
    checkpoint = Checkpoint.open(path)
    total = 0
    for name in names:
        with safe_open(checkpoint.weight_map[name], framework="numpy") as handle:
            total += handle.get_tensor(name).nbytes
    return total


def parameter_names(stage: TorchStage) -> set[str]:
    return {name for name, _ in stage.model.named_parameters(remove_duplicate=False)}


def parameter_bytes(stage: TorchStage) -> int:
    return sum(p.numel() * p.element_size() for p in stage.model.parameters())


@pytest.mark.parametrize("layer_ranges", SPLITS.values(), ids=SPLITS.keys())
@pytest.mark.parametrize("arch", ARCHS)
def test_split_stages_give_the_same_tokens_and_logits_as_one(
    arch: str, layer_ranges: list[tuple[int, int]], tiny_checkpoint: Callable[..., Path]
) -> None:
    path = tiny_checkpoint(arch=arch)
    whole = load_stage(path, (0, 4))
    split = [load_stage(path, layer_range) for layer_range in layer_ranges]
    prompt = make_prompt(whole.config.vocab_size, 20)

    expected_tokens, expected_logits = greedy_decode([whole], prompt, 32)
    tokens, logits = greedy_decode(split, prompt, 32)

    assert tokens == expected_tokens
    np.testing.assert_allclose(logits, expected_logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_mixed_prefill_and_decode_step_equals_each_sequence_alone(
    arch: str, tiny_checkpoint: Callable[..., Path]
) -> None:
    path = tiny_checkpoint(arch=arch)
    mixed, alone = load_stage(path, (0, 4)), load_stage(path, (0, 4))
    vocab = mixed.config.vocab_size
    prompt_a, history_b, history_c = (make_prompt(vocab, n, seed) for n, seed in ((7, 1), (6, 2), (4, 3)))
    # Sequences b and c have their first tokens in the caches already: together on one stage, apart on the other.
    pipeline_logits(
        [mixed], [Segment(2, 0, 5), Segment(3, 0, 3)], np.concatenate([history_b[:5], history_c[:3]])
    )
    pipeline_logits([alone], [Segment(2, 0, 5)], history_b[:5])
    pipeline_logits([alone], [Segment(3, 0, 3)], history_c[:3])

    decode_b = Segment(2, 5, 1, sample=True)
    prefill_a = Segment(1, 0, 7, sample=True)
    decode_c = Segment(3, 3, 1, sample=True)
    logits = pipeline_logits(
        [mixed], [decode_b, prefill_a, decode_c], np.concatenate([history_b[5:], prompt_a, history_c[3:]])
    )
    expected = [
        pipeline_logits([alone], [decode_b], history_b[5:])[0],
        pipeline_logits([alone], [prefill_a], prompt_a)[0],
        pipeline_logits([alone], [decode_c], history_c[3:])[0],
    ]

    # A decode token takes the one-query attention (two matmuls), a longer segment the fused kernel: they
    # agree to float32 rounding (~2e-7 an attention output), which is up to ~1e-5 on logits of magnitude ~10.
    np.testing.assert_allclose(logits, np.stack(expected), rtol=2e-6, atol=1e-5)


def test_middle_stage_holds_only_its_own_layers(tiny_checkpoint: Callable[..., Path]) -> None:
    path = tiny_checkpoint(layers=6)
    stage = load_stage(path, (2, 4))
    own = {
        name
        for name in Checkpoint.open(path).weight_map
        if name.startswith(("model.layers.2.", "model.layers.3."))
    }

    names = parameter_names(stage)

    assert not stage.is_first and not stage.is_last
    assert names == {name.removeprefix("model.") for name in own}
    assert not any(name.startswith(("embed_tokens.", "lm_head.", "norm.")) for name in names)
    assert parameter_bytes(stage) == stage.weight_bytes() == checkpoint_tensor_bytes(path, own)


def test_middle_stage_reads_only_its_own_tensors_from_disk(
    tiny_checkpoint: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tiny_checkpoint(layers=6)
    read: list[str] = []

    class RecordingHandle:
        def __init__(self, handle: Any):
            self.handle = handle

        def get_tensor(self, name: str) -> Any:
            read.append(name)
            return self.handle.get_tensor(name)

        def __getattr__(self, attribute: str) -> Any:
            return getattr(self.handle, attribute)

    @contextmanager
    def recording_safe_open(file: Any, framework: str, **options: Any) -> Iterator[RecordingHandle]:
        with safe_open(file, framework=framework, **options) as handle:
            yield RecordingHandle(handle)

    monkeypatch.setattr(weights, "safe_open", recording_safe_open)
    load_stage(path, (2, 4))

    assert read
    assert all(name.startswith(("model.layers.2.", "model.layers.3.")) for name in read)


def test_last_stage_of_tied_checkpoint_has_lm_head_but_no_embedding(
    tiny_checkpoint: Callable[..., Path],
) -> None:
    path = tiny_checkpoint(arch="qwen3")
    checkpoint = Checkpoint.open(path)
    assert checkpoint.config.tie_word_embeddings and "lm_head.weight" not in checkpoint.weight_map
    stage = load_stage(checkpoint, (2, 4))

    names = parameter_names(stage)

    assert stage.is_last and not stage.is_first
    assert "lm_head.weight" in names and "norm.weight" in names
    assert not any(name.startswith("embed_tokens.") for name in names)
    with safe_open(checkpoint.weight_map["model.embed_tokens.weight"], framework="pt") as handle:
        torch.testing.assert_close(stage.model.lm_head.weight, handle.get_tensor("model.embed_tokens.weight"))
    own = {
        name
        for name in checkpoint.weight_map
        if name.startswith(("model.layers.2.", "model.layers.3.", "model.norm."))
    }
    assert stage.weight_bytes() == checkpoint_tensor_bytes(path, own | {"model.embed_tokens.weight"})


def test_whole_model_of_tied_checkpoint_holds_the_embedding_once(
    tiny_checkpoint: Callable[..., Path],
) -> None:
    path = tiny_checkpoint(arch="qwen3")
    stage = load_stage(path, (0, 4))

    assert stage.model.lm_head.weight is stage.model.embed_tokens.weight
    assert stage.weight_bytes() == checkpoint_tensor_bytes(path, set(Checkpoint.open(path).weight_map))


def test_first_stage_of_tied_checkpoint_has_embedding_but_no_lm_head(
    tiny_checkpoint: Callable[..., Path],
) -> None:
    stage = load_stage(tiny_checkpoint(arch="qwen3"), (0, 2))

    names = parameter_names(stage)

    assert stage.is_first and not stage.is_last
    assert "embed_tokens.weight" in names
    assert not any(name.startswith(("lm_head.", "norm.")) for name in names)


def test_release_frees_the_caches_of_those_sequences(tiny_checkpoint: Callable[..., Path]) -> None:
    stage = load_stage(tiny_checkpoint(), (0, 4))
    prompt = make_prompt(stage.config.vocab_size, 6)
    first = pipeline_logits([stage], [Segment(1, 0, 6, sample=True), Segment(2, 0, 6)], np.tile(prompt, 2))
    assert stage.live_sequences() == 2

    stage.release([1, 99])  # an unknown id is ignored
    assert stage.live_sequences() == 1
    stage.release([2])
    assert stage.live_sequences() == 0

    again = pipeline_logits([stage], [Segment(1, 0, 6, sample=True)], prompt)  # a released id starts afresh
    np.testing.assert_allclose(again[0], first[0], rtol=0, atol=1e-5)


def test_step_restarted_at_an_earlier_position_recomputes_from_there(
    tiny_checkpoint: Callable[..., Path],
) -> None:
    stage = load_stage(tiny_checkpoint(), (0, 4))
    vocab = stage.config.vocab_size
    prompt, replacement = make_prompt(vocab, 12, seed=1), make_prompt(vocab, 4, seed=2)
    pipeline_logits([stage], [Segment(0, 0, 12)], prompt)
    pipeline_logits([stage], [Segment(0, 12, 1)], prompt[:1])  # the cache now holds 13 positions
    rewritten = np.concatenate([prompt[:6], replacement])
    expected = [pipeline_logits([stage], [Segment(1, 0, 10, sample=True)], rewritten)[0]]
    expected.append(pipeline_logits([stage], [Segment(1, 10, 1, sample=True)], prompt[:1])[0])

    restarted = pipeline_logits([stage], [Segment(0, 6, 4, sample=True)], replacement)[0]
    next_token = pipeline_logits([stage], [Segment(0, 10, 1, sample=True)], prompt[:1])[0]

    # Chunks of other sizes round float32 sums differently (1e-5 on some CPUs); a stale cache is off by O(1).
    np.testing.assert_allclose(np.stack([restarted, next_token]), np.stack(expected), rtol=0, atol=1e-4)


def test_step_beyond_the_cached_positions_is_refused(tiny_checkpoint: Callable[..., Path]) -> None:
    stage = load_stage(tiny_checkpoint(), (0, 4))
    prompt = make_prompt(stage.config.vocab_size, 5)
    pipeline_logits([stage], [Segment(0, 0, 5)], prompt)

    with pytest.raises(StageError, match="sequence 0"):
        pipeline_logits([stage], [Segment(0, 7, 1)], prompt[:1])


def test_new_sequence_that_does_not_start_at_zero_is_refused(tiny_checkpoint: Callable[..., Path]) -> None:
    stage = load_stage(tiny_checkpoint(), (0, 4))

    with pytest.raises(StageError, match="sequence 1"):
        pipeline_logits([stage], [Segment(1, 3, 1)], np.array([5]))
    assert stage.live_sequences() == 0


def test_a_misspelt_load_option_is_an_error_not_ignored(tiny_checkpoint: Callable[..., Path]) -> None:
    with pytest.raises(TypeError, match="dtpye"):
        load_stage(tiny_checkpoint(), (0, 2), dtpye="bfloat16")  # type: ignore[call-arg]
