"""A torch stage's KV pools: the decode tokens of many sequences attend in one call per pool and layer,
and give what each sequence gives alone (one call of its own); sequences move to a pool of a bigger
capacity as they grow, slots are reused, and pools with no sequence are freed (but one)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from meshllm.engines.torch.kv import MIN_CAPACITY, POOL_POSITIONS, step_kv
from meshllm.engines.torch.stage import TorchStage, load_stage
from meshllm.models.tiny import ARCHS
from meshllm.runtime.stage_host import LocalStageHost
from meshllm.step import Segment
from tests.engines.stage_helpers import make_prompt, pipeline_logits


def with_window(path: Path, window: int, folder: Path) -> Path:
    """A copy of a (mistral) checkpoint whose attention sees only the last `window` positions."""
    folder.mkdir()
    for item in path.iterdir():
        (folder / item.name).symlink_to(item)
    config = json.loads((path / "config.json").read_text())
    config.update(sliding_window=window, use_sliding_window=True)
    (folder / "config.json").unlink()
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def decode_each_alone(stage: TorchStage, seq_id: int, position: int, token: int) -> np.ndarray:
    return pipeline_logits([stage], [Segment(seq_id, position, 1, sample=True)], np.array([token]))[0]


CASES = [*ARCHS, "mistral-window"]


@pytest.mark.parametrize("case", CASES)
def test_decode_tokens_of_many_sequences_in_one_step_equal_each_sequence_alone(
    case: str, tiny_checkpoint: Callable[..., Path], tmp_path: Path
) -> None:
    path = tiny_checkpoint(arch=case.split("-")[0])
    if case == "mistral-window":
        path = with_window(path, 8, tmp_path / "windowed")
    together, alone = load_stage(path, (0, 4)), load_stage(path, (0, 4))
    vocab = together.config.vocab_size
    # more sequences than a pool has slots, of lengths far apart; one crosses into a bigger capacity
    lengths = {1: 3, 2: 9, 3: 17, 4: MIN_CAPACITY - 3, 5: 5, 6: 30, 8: 2, 9: 11, 10: 6, 11: 40}
    assert len(lengths) > POOL_POSITIONS // MIN_CAPACITY
    prompts = {seq: make_prompt(vocab, n, seed=seq) for seq, n in lengths.items()}
    for seq, prompt in prompts.items():
        for stage in (together, alone):
            pipeline_logits([stage], [Segment(seq, 0, len(prompt))], prompt)

    positions = dict(lengths)
    rng = np.random.default_rng(0)
    for step in range(8):
        if step == 3:  # a sequence leaves and a new one takes its slot
            for stage in (together, alone):
                stage.release([2])
            del positions[2]
            prompt = make_prompt(vocab, 4, seed=7)
            for stage in (together, alone):
                pipeline_logits([stage], [Segment(7, 0, 4)], prompt)
            positions[7] = 4
        tokens = {seq: int(rng.integers(vocab)) for seq in positions}
        segments = [Segment(seq, position, 1, sample=True) for seq, position in positions.items()]
        logits = pipeline_logits([together], segments, np.array(list(tokens.values())))
        expected = [decode_each_alone(alone, seq, positions[seq], tokens[seq]) for seq in positions]
        # one call over padded, masked rows or one per sequence: float32 rounding apart
        np.testing.assert_allclose(logits, np.stack(expected), rtol=1e-5, atol=1e-4)
        positions = {seq: position + 1 for seq, position in positions.items()}
    assert positions[4] > MIN_CAPACITY  # it grew into the next pool on the way
    pools = together._pools.by_capacity
    assert sorted(pools) == [MIN_CAPACITY, 2 * MIN_CAPACITY] and len(pools[MIN_CAPACITY]) == 2


def test_a_released_slot_is_taken_again_and_pools_without_sequences_are_dropped(
    tiny_checkpoint: Callable[..., Path],
) -> None:
    stage = load_stage(tiny_checkpoint(), (0, 4))
    prompt = make_prompt(stage.config.vocab_size, 6)
    for seq in range(3):
        pipeline_logits([stage], [Segment(seq, 0, 6)], prompt)
    held = stage.kv_bytes()
    assert held > 0
    stage.release([1])
    pipeline_logits([stage], [Segment(9, 0, 6)], prompt)  # into the freed slot: nothing grows
    assert stage.kv_bytes() == held
    assert stage._caches[9].slot == 1

    long_prompt = make_prompt(stage.config.vocab_size, MIN_CAPACITY + 1)
    pipeline_logits([stage], [Segment(10, 0, len(long_prompt))], long_prompt)
    assert stage.kv_bytes() == 2 * held  # a pool of twice the capacity (half the slots) beside the first
    stage.release([0, 2, 9, 10])
    # every pool freed but the last emptied, kept for the next sequence
    assert stage.kv_bytes() == held and stage.live_sequences() == 0
    pipeline_logits([stage], [Segment(11, 0, len(long_prompt))], long_prompt)
    assert stage.kv_bytes() == held


def test_a_micro_batch_attends_over_its_own_run_of_slots_with_the_same_logits(
    tiny_checkpoint: Callable[..., Path],
) -> None:
    together, alone = load_stage(tiny_checkpoint(), (0, 4)), load_stage(tiny_checkpoint(), (0, 4))
    vocab = together.config.vocab_size
    prompts = {seq: make_prompt(vocab, 5 + seq, seed=seq) for seq in range(8)}
    for seq, prompt in prompts.items():
        for stage in (together, alone):
            pipeline_logits([stage], [Segment(seq, 0, len(prompt))], prompt)
    slots = {seq: together._caches[seq].slot for seq in prompts}
    assert slots == {seq: seq for seq in range(8)}

    def runs(seqs: list[int]) -> list[tuple[int, int]]:
        segments = [Segment(seq, len(prompts[seq]), 1) for seq in seqs]
        kv = step_kv(segments, [together._caches[seq] for seq in seqs], window=None)
        return [(batch.first, batch.mask.shape[0]) for batch in kv.batches]

    assert runs([4, 5, 6, 7]) == [(4, 4)]  # the second micro-batch: none of the first's rows
    assert runs([0, 2, 4, 6]) == [(0, 7)]  # half its rows or more are the step's: one call
    assert runs([0, 7]) == []  # far apart: each on its own

    for seqs in ([4, 5, 6, 7], [0, 2, 4, 6]):
        tokens = np.arange(len(seqs)) + 3
        segments = [Segment(seq, len(prompts[seq]), 1, sample=True) for seq in seqs]
        logits = pipeline_logits([together], segments, tokens)
        expected = [
            decode_each_alone(alone, seq, len(prompts[seq]), int(token))
            for seq, token in zip(seqs, tokens, strict=True)
        ]
        np.testing.assert_allclose(logits, np.stack(expected), rtol=1e-5, atol=1e-4)
        for seq in seqs:
            prompts[seq] = np.append(prompts[seq], 0)  # one position more held


def test_pools_stay_within_the_kv_memory_the_host_allows(tiny_checkpoint: Callable[..., Path]) -> None:
    stage = load_stage(tiny_checkpoint(), (0, 4))
    room = 600 * stage.kv_bytes_per_token()  # 600 positions: two slots of 256 a pool, not eight
    host = LocalStageHost.of("s0", stage, kv_memory=room)
    assert host.kv_memory == room
    prompt = make_prompt(stage.config.vocab_size, 6)
    for seq in range(2):
        pipeline_logits([stage], [Segment(seq, 0, 6)], prompt)
    assert stage.kv_bytes() == 2 * MIN_CAPACITY * stage.kv_bytes_per_token() <= room
    long_prompt = make_prompt(stage.config.vocab_size, 2 * MIN_CAPACITY + 1)  # 1024 positions: one slot
    pipeline_logits([stage], [Segment(5, 0, len(long_prompt))], long_prompt)
    assert len(stage._pools.by_capacity[4 * MIN_CAPACITY]) == 1
