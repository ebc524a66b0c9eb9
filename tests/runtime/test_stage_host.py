"""The stage host: load a range, step, sample when last, release; the same code a worker serves."""

from __future__ import annotations

import numpy as np
import pytest

from meshllm.errors import StageError
from meshllm.runtime.stage_host import LocalStageHost
from meshllm.step import LayerRange, SamplingParams, Segment, StepInput
from meshllm.transport.stage import LoadSpec

PROMPT = np.array([5, 17, 42, 99], dtype=np.int64)


def test_a_host_says_what_it_has_before_and_after_load(tiny_checkpoint) -> None:
    host = LocalStageHost("w1", engine="torch")
    info = host.info()
    assert (info.layers, info.model, info.num_layers, info.engine) == (None, "", 0, "torch")
    assert host.health().message == "waiting for Load" and not host.loaded
    fractions: list[float] = []
    host.load(LoadSpec(str(tiny_checkpoint()), LayerRange(2, 4), "float32"), fractions.append)
    info = host.info()
    assert (info.layers, info.num_layers, info.weight_bytes > 0) == ((2, 4), 4, True)
    assert host.health().message == "layers [2, 4)" and fractions[-1] == 1.0


def test_the_first_stage_returns_hidden_states_and_the_last_samples(tiny_checkpoint) -> None:
    path = str(tiny_checkpoint())
    first, last = LocalStageHost("a", engine="torch"), LocalStageHost("b", engine="torch")
    first.load(LoadSpec(path, LayerRange(0, 2), "float32"), lambda _: None)
    last.load(LoadSpec(path, LayerRange(2, 4), "float32"), lambda _: None)
    segments = [Segment(11, 0, 4, sample=True, sampling=SamplingParams(seed=3))]
    middle = first.step(StepInput(1, segments, token_ids=PROMPT))
    assert middle.tokens is None and tuple(middle.hidden_states.shape) == (4, 64)
    outcome = last.step(StepInput(1, segments, hidden_states=middle.hidden_states))
    assert outcome.hidden_states is None and [t.seq_id for t in outcome.tokens or []] == [11]
    assert last.release([11, 999]) == 0 and first.release([11]) == 0


def test_a_step_before_load_is_a_stage_error(tiny_checkpoint) -> None:
    with pytest.raises(StageError, match="worker w1: no layers loaded yet"):
        LocalStageHost("w1", engine="torch").step(StepInput(1, [Segment(1, 0, 1)], token_ids=PROMPT[:1]))


@pytest.mark.parametrize("engine", ["torch", "mlx"])
def test_a_loaded_host_reports_its_kv_bytes_per_token_and_kv_memory(tiny_checkpoint, engine) -> None:
    host = LocalStageHost("w1", engine=engine, kv_memory=123_456)
    assert (host.info().kv_bytes_per_token, host.info().kv_memory) == (0, 0)  # nothing loaded yet
    host.load(LoadSpec(str(tiny_checkpoint()), LayerRange(1, 4), "bfloat16"), lambda _: None)
    # keys and values × 3 layers × 2 KV heads × 16 dims × 2 bytes
    assert (host.info().kv_bytes_per_token, host.info().kv_memory) == (2 * 3 * 2 * 16 * 2, 123_456)


def test_without_kv_memory_a_host_allows_a_share_of_the_free_memory(tiny_checkpoint) -> None:
    host = LocalStageHost("w1", engine="torch")
    host.load(LoadSpec(str(tiny_checkpoint()), LayerRange(0, 2), "float32"), lambda _: None)
    info = host.info()
    assert 0 < info.kv_memory < info.memory_total
    tenth = LocalStageHost("w2", engine="torch", kv_memory=0.1)  # a float: a share of the free memory
    tenth.load(LoadSpec(str(tiny_checkpoint()), LayerRange(0, 2), "float32"), lambda _: None)
    assert 0 < tenth.info().kv_memory < info.kv_memory / 4


def test_a_malformed_step_changes_no_cache_and_the_sequence_goes_on(tiny_checkpoint) -> None:
    host = LocalStageHost("w1", engine="torch")
    host.load(LoadSpec(str(tiny_checkpoint()), LayerRange(0, 4), "float32"), lambda _: None)
    greedy = SamplingParams(seed=1)
    first = host.step(StepInput(1, [Segment(7, 0, 4, True, greedy)], token_ids=PROMPT)).tokens
    assert first
    # a valid segment of sequence 7 next to one that skips ahead: the whole step is refused
    bad = [Segment(7, 4, 1, True, greedy), Segment(8, 3, 1, True, greedy)]
    with pytest.raises(StageError, match="sequence 8 is not known here"):
        host.step(StepInput(2, bad, token_ids=np.array([first[0].token_id, 5])))
    assert host.info().live_sequences == 1
    again = host.step(StepInput(3, bad[:1], token_ids=np.array([first[0].token_id]))).tokens
    reference = LocalStageHost("ref", engine="torch")
    reference.load(LoadSpec(str(tiny_checkpoint()), LayerRange(0, 4), "float32"), lambda _: None)
    reference.step(StepInput(1, [Segment(7, 0, 4, True, greedy)], token_ids=PROMPT))
    expected = reference.step(StepInput(2, bad[:1], token_ids=np.array([first[0].token_id]))).tokens
    assert again == expected
