"""The speed prediction: a step's cost from bytes read and arithmetic, pipelining over many streams."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from meshllm.devices import Calibration, Link
from meshllm.models.checkpoint import Checkpoint
from meshllm.models.plan import make_plan, model_weights
from meshllm.models.predict import CostModel, StageCost, best_schedule, describe, predict, step_balance
from meshllm.models.tiny import TinySpec, make_checkpoint
from meshllm.step import LayerRange

GB = 1e9


def stage(
    read_gb: float, weights: float = 0.0, bandwidth: float = 10 * GB, flops: float = 100 * GB
) -> StageCost:
    return StageCost("d", int(read_gb * GB), int(weights), 0, bandwidth, flops)


def test_one_stream_reads_every_weight_once_per_token() -> None:
    prediction = predict([stage(1.0)], [], 0, streams=1)
    assert prediction.one_stream == pytest.approx(10.0)  # 1 GB at 10 GB/s: 0.1 s a token


def test_one_stream_reads_at_the_speed_of_a_step_alone_and_many_at_the_shared_one() -> None:
    shared, alone = 5 * GB, 10 * GB  # two stages on one machine: one core each, or both for a lone step
    halves = [StageCost("d", int(0.5 * GB), 0, 0, shared, 100 * GB, alone)] * 2
    prediction = predict(halves, [Link(0.0, 1e12)], 0, streams=16)
    assert prediction.one_stream == pytest.approx(10.0)  # 2 × 0.5 GB at 10 GB/s
    assert prediction.many_streams == pytest.approx(16 / (2 * 0.1))  # 2 micro-batches, 0.1 s a step


def test_stages_on_one_compute_unit_take_turns_at_every_core_with_the_whole_batch() -> None:
    shared, alone = 5 * GB, 10 * GB  # one core each while both compute, both cores for a step alone
    own = [StageCost("d", int(0.5 * GB), int(1e8), 0, shared, 100 * GB, alone)] * 2
    turns = [replace(cost, compute="machine/cpu/0-1") for cost in own]
    pipelined = predict(own, [Link(0.0, 1e12)], 0, streams=16)
    taking_turns = predict(turns, [Link(0.0, 1e12)], 0, streams=16)
    assert taking_turns.one_stream == pytest.approx(pipelined.one_stream)  # a lone stream: no difference
    # One step of 16 tokens at a time, each stage reading its half at the lone step's speed, against
    # two micro-batches of 8, each stage reading its half twice at the shared one's:
    step = 0.05 + 2 * 1e8 * 15 / (100 * GB)
    assert taking_turns.many_streams == pytest.approx(16 / (2 * step))
    assert pipelined.many_streams == pytest.approx(16 / (2 * (0.1 + 2 * 1e8 * 7 / (100 * GB))))
    assert taking_turns.many_streams > pipelined.many_streams
    # Their prompts take turns too: every stage's prefill in full, none hidden behind another's.
    assert taking_turns.many_streams_total < taking_turns.many_streams


def test_the_faster_way_for_stages_on_one_unit_is_chosen_and_stages_apart_have_one_way() -> None:
    # Reading weights dominates, and a step alone reads twice as fast: taking turns wins.
    reads = [StageCost("d", int(0.5 * GB), int(1e8), 0, 5 * GB, 100 * GB, 10 * GB, compute="m/cpu/0-1")] * 2
    prediction, turns = best_schedule(reads, [Link(0.0, 1e12)], 0, streams=16)
    assert turns and prediction == predict(reads, [Link(0.0, 1e12)], 0, 16, take_turns=True)
    # Arithmetic dominates, and gains little from a lone step's threads (an engine that scales badly
    # with threads): the overlap of two micro-batches wins.
    arithmetic = [
        replace(cost, read_bytes=int(0.01 * GB), layers=10, layer_token_seconds=0.002,
                layer_token_seconds_alone=0.0019)
        for cost in reads
    ]  # fmt: skip
    prediction, turns = best_schedule(arithmetic, [Link(0.0, 1e12)], 0, streams=16)
    assert not turns and prediction == predict(arithmetic, [Link(0.0, 1e12)], 0, 16, take_turns=False)
    apart = [replace(cost, compute=f"m{index}/cpu/0-1") for index, cost in enumerate(reads)]
    assert best_schedule(apart, [Link(0.0, 1e12)], 0, streams=16)[1] is False


def test_a_step_alone_adds_its_tokens_at_the_lone_threads_timing_the_head_gaining_as_the_layers_did() -> None:
    timed = StageCost(
        "d", 0, 0, int(1e8), GB, 100 * GB, 2 * GB, 50 * GB, layers=10, layer_token_seconds=0.002,
        layer_token_seconds_alone=0.001,
    )  # fmt: skip
    shared = timed.step_seconds(16)
    alone = timed.step_seconds(16, alone=True)
    assert shared == pytest.approx(15 * (10 * 0.002 + 2 * 1e8 / (50 * GB)))
    assert alone == pytest.approx(15 * (10 * 0.001 + 2 * 1e8 / (100 * GB)))  # twice the decode rate


def test_stages_of_one_unit_computing_at_once_share_its_read_speed_and_a_lone_step_s_prompts_gain() -> None:
    cost = StageCost(
        "d", int(GB), 0, 0, 8 * GB, 100 * GB, 12 * GB, layers=10, layer_token_seconds=0.002,
        layer_token_seconds_alone=0.001, layer_prompt_seconds=0.001, compute="m/cpu/0-1",
    )  # fmt: skip
    assert cost.sharing(2).read_bandwidth == 6 * GB  # 12 GB/s between two, below the 8 one thread reads
    assert (
        cost.sharing(1) is cost
        and replace(cost, alone_read_bandwidth=0.0).sharing(2).read_bandwidth == 8 * GB
    )
    shared = cost.step_seconds(100, head_tokens=1)
    alone = cost.step_seconds(100, head_tokens=1, alone=True)
    assert shared == pytest.approx(1 / 8 + 100 * 10 * 0.001)
    assert alone == pytest.approx(1 / 12 + 100 * 10 * 0.0005)  # twice as fast, as its decode tokens


def test_a_split_adds_its_links_to_one_stream_and_pipelines_many() -> None:
    whole = predict([stage(1.0, weights=5e7)], [], 0, streams=16)
    halves = predict([stage(0.5, weights=2.5e7)] * 2, [Link(0.001, 1 * GB)], 2048, streams=16)
    assert halves.one_stream == pytest.approx(1 / (2 * 0.05 + 0.001 + 2048 / GB), rel=1e-6)
    assert halves.one_stream < whole.one_stream
    # Two micro-batches of 8 keep both halves busy; as long as reading weights dominates, each device
    # reads its half once per micro-batch, so the total stays near the whole model's batch of 16.
    assert 0.9 * whole.many_streams < halves.many_streams < 1.2 * whole.many_streams
    assert halves.many_streams > 10 * halves.one_stream
    assert halves.many_streams_total < halves.many_streams  # the prompts' prefill takes its time


def test_arithmetic_grows_with_the_batch_and_prefill_skips_the_head_for_all_but_the_last_token() -> None:
    cost = StageCost("d", 500, 1000, 400, 1000.0, 2000.0)
    assert cost.step_seconds(1) == pytest.approx(0.5)  # one token's arithmetic is in the read speed
    assert cost.step_seconds(10) == pytest.approx(0.5 + 2 * 1000 * 9 / 2000)
    assert cost.step_seconds(10, head_tokens=1) == pytest.approx(0.5 + (600 * 10 + 400) * 2 / 2000)


def test_decode_steps_add_their_arithmetic_at_the_decode_rate_and_prompt_chunks_at_the_batch_rate() -> None:
    """A CPU computes less over weights streamed from memory (decode of many streams) than over a
    prompt chunk's: measured on a 2-core Xeon, 16-token q8_0 decode steps ran at about two thirds of
    the rate 32-token matmuls over cached matrices gave, which put a 16-stream prediction 30% high."""
    cost = StageCost("d", 500, 1000, 400, 1000.0, 2000.0, decode_flop_rate=500.0)
    assert cost.step_seconds(16) == pytest.approx(0.5 + 2 * 1000 * 15 / 500)
    assert cost.step_seconds(64, head_tokens=4) == pytest.approx(0.5 + (600 * 64 + 400 * 4) * 2 / 2000)


def test_each_decode_token_reads_its_sequences_cache_and_the_prediction_counts_the_mean_context() -> None:
    """Attention reads every cached key and value of the token's sequence: for 16 streams of Qwen3-0.6B
    at 160 tokens of context, 16 × 18 MB a step, a quarter of what the weights are."""
    cost = StageCost("d", 500, 1000, 400, 1000.0, 2000.0, cache_bytes=2)
    assert cost.step_seconds(1, context=100) == pytest.approx(0.5 + 100 * 2 / 1000)
    assert cost.step_seconds(16, context=100) == pytest.approx(
        0.5 + 16 * 100 * 2 / 1000 + 2 * 1000 * 15 / 2000
    )
    assert cost.step_seconds(64, head_tokens=4, context=100) == cost.step_seconds(64, head_tokens=4)
    prediction = predict([cost], [], 0, streams=1, prompt_tokens=100, new_tokens=40)
    assert prediction.one_stream == pytest.approx(1 / (0.5 + 120 * 2 / 1000))  # 100 + 40 / 2 cached


def test_layers_timed_on_the_models_shape_set_what_tokens_add_and_the_head_stays_at_the_matmul_rates() -> (
    None
):
    """Measured on a 2-core Xeon at the Qwen3-0.6B shape in bfloat16: each token of a 16-sequence decode
    step past the first added 8.8 ms, where the matmul rates over as many weights accounted for 3.9; the
    rest (attention over each sequence's cache, norms, rotary embeddings, the engine's work per sequence)
    is in a timed layer and in no matmul."""
    cost = StageCost(
        "d",
        500,
        1000,
        400,
        1000.0,
        2000.0,
        decode_flop_rate=500.0,
        cache_bytes=2,
        layers=3,
        layer_token_seconds=0.25,
        layer_prompt_seconds=0.125,
    )
    added = 3 * 0.25 + 2 * 400 / 500  # the layers as timed; the head's arithmetic at the decode rate
    assert cost.step_seconds(1, context=100) == pytest.approx(0.5 + 100 * 2 / 1000)
    assert cost.step_seconds(16, context=100) == pytest.approx(0.5 + 100 * 2 / 1000 + 15 * added)
    # a prompt chunk: every token through every layer as timed, the head for the sampled ones only
    assert cost.step_seconds(64, head_tokens=4) == pytest.approx(0.5 + 64 * 3 * 0.125 + 2 * 400 * 4 / 2000)


def test_a_step_takes_at_least_what_its_layers_took_with_their_weights_close_by() -> None:
    """Measured on a 2-core Xeon at the Qwen3-0.6B shape: the torch engine's int4 layers read at 10.7 GB/s
    promised ~34 ms a token where the engine took ~53 (eager PyTorch's work around each layer's kernels);
    two random int4 layers took 1.16 ms each in one-token steps, their 18 MB in the caches."""
    eager = StageCost("d", 500, 1000, 400, 1000.0, 2000.0, layers=3, layer_step_seconds=0.25, head_bytes=100)
    assert eager.step_seconds(1) == pytest.approx(3 * 0.25 + 100 / 1000)  # the layers' floor, then the head
    lean = StageCost("d", 500, 1000, 400, 1000.0, 2000.0, layers=3, layer_step_seconds=0.05, head_bytes=100)
    assert lean.step_seconds(1) == pytest.approx(0.5)  # reading the weights takes longer


def test_stage_costs_carry_their_layers_and_the_devices_layer_timings(
    tiny_checkpoint: Callable[..., Path],
) -> None:
    checkpoint = Checkpoint.open(tiny_checkpoint(layers=4))
    calibration = Calibration(10 * GB, 100 * GB, 0, 0, 0.002, 0.001, 0.003)
    model = CostModel(checkpoint, "float32", 64)
    cost = model.cost("a", LayerRange(1, 4), None, calibration)
    assert (cost.layers, cost.layer_token_seconds, cost.layer_prompt_seconds) == (3, 0.002, 0.001)
    assert cost.layer_step_seconds == 0.003 and cost.head_bytes == model.held(None).head
    assert model.cost("a", LayerRange(0, 3), None, calibration).head_bytes == 0  # not the last stage


def test_stage_costs_hold_the_keys_and_values_of_their_layers(tiny_checkpoint: Callable[..., Path]) -> None:
    checkpoint = Checkpoint.open(tiny_checkpoint(layers=4))
    config = checkpoint.config
    per_layer = 2 * config.num_key_value_heads * config.head_dim  # keys and values, one element each
    calibration = Calibration(10 * GB, 100 * GB)
    for dtype, element in (("float32", 4), ("bfloat16", 2)):
        cost = CostModel(checkpoint, dtype, 64).cost("a", LayerRange(1, 4), None, calibration)
        assert cost.cache_bytes == 3 * per_layer * element


def test_stage_costs_follow_the_plan_and_the_lone_device_is_named(
    tiny_checkpoint: Callable[..., Path],
) -> None:
    checkpoint = Checkpoint.open(tiny_checkpoint(layers=4))
    devices = [("a", 10**10), ("b", 10**10)]
    plan = make_plan(checkpoint, devices, "float32")
    calibrations = {"a": Calibration(10 * GB, 100 * GB), "b": Calibration(10 * GB, 100 * GB)}
    model = CostModel(checkpoint, "float32", 64)
    costs = model.stage_costs(plan, {}, calibrations)
    weights = model_weights(checkpoint)
    assert sum(cost.weights for cost in costs) == weights.read(0, 4)
    assert costs[-1].head_weights == weights.head and costs[0].head_weights == 0
    assert costs[0].read_bytes == 4 * weights.read(*plan[0].layer_range)  # float32 weights: 4 bytes each
    prediction = predict(costs, [Link(0.01, GB)], 256, streams=16)
    alone = model.best_alone(devices, {}, calibrations, 16)
    assert alone is not None and alone[1].one_stream > prediction.one_stream
    text = describe(prediction, alone, len(plan))
    assert text.startswith("predicted decode: ") and "a alone:" in text


def test_no_device_alone_when_none_holds_the_whole_model(tiny_checkpoint: Callable[..., Path]) -> None:
    checkpoint = Checkpoint.open(tiny_checkpoint(layers=4))
    calibrations = {"a": Calibration(GB, GB)}
    assert CostModel(checkpoint, "float32", 64).best_alone([("a", 1000)], {}, calibrations, 4) is None


def test_stages_on_units_of_their_own_are_balanced_per_step_of_many_streams(tmp_path: Path) -> None:
    # A head as heavy as a few layers to read: balanced per token, the last stage takes fewer layers.
    # Per step of 8 tokens (16 streams over 2 stages) the layers' own work per token dominates and the
    # head, one matmul, weighs little: balanced per step, the split is even.
    spec = TinySpec(num_hidden_layers=12, vocab_size=2048, fill_vocab=True)
    checkpoint = Checkpoint.open(make_checkpoint(tmp_path / "model", spec=spec))
    devices = [("a", 10**10), ("b", 10**10)]
    per_token = [stage.layer_range for stage in make_plan(checkpoint, devices, "float32")]
    assert per_token[1].end - per_token[1].start < 5
    calibration = Calibration(10 * GB, 100 * GB, 0, 1000 * GB, 0.001, 0.0001, 0.0)
    seconds = step_balance(CostModel(checkpoint, "float32", 64), calibration, [None, None], streams=16)
    per_step = [
        stage.layer_range for stage in make_plan(checkpoint, devices, "float32", stage_seconds=seconds)
    ]
    assert per_step == [LayerRange(0, 6), LayerRange(6, 12)]
    # a device half as fast takes fewer layers there too
    halved = make_plan(checkpoint, devices, "float32", speeds={"a": 1.0, "b": 0.5}, stage_seconds=seconds)
    assert [stage.layer_range for stage in halved] == [LayerRange(0, 8), LayerRange(8, 12)]


def test_a_start_balances_per_step_only_where_every_stage_has_its_own_unit_and_layers_were_timed(
    tiny_checkpoint: Callable[..., Path],
) -> None:
    from meshllm.runtime.coordinator_config import CoordinatorConfig
    from meshllm.runtime.startup import _step_balance

    path = tiny_checkpoint(layers=4)
    config, checkpoint = CoordinatorConfig(model=str(path), dtype="float32"), Checkpoint.open(path)
    devices, quantize = [("a", 10**10), ("b", 10**10)], {"a": None, "b": None}
    timed = {
        "a": Calibration(10 * GB, 100 * GB, 0, 0, 0.001),
        "b": Calibration(20 * GB, 100 * GB, 0, 0, 0.002),
    }
    apart = {"a": "vm/cpu/0", "b": "vm/cpu/1"}
    seconds = _step_balance(config, checkpoint, devices, quantize, timed, apart)
    assert seconds is not None  # on the fastest device's figures: b's
    assert seconds(0, 0, 2) == pytest.approx(
        step_balance(CostModel(checkpoint, "float32", 64), timed["b"], [None, None], 16)(0, 0, 2)
    )
    shared = {"a": "vm/cpu/0-1", "b": "vm/cpu/0-1"}  # taking turns: any split does the same work
    assert _step_balance(config, checkpoint, devices, quantize, timed, shared) is None
    untimed = {"a": Calibration(10 * GB, 100 * GB), "b": Calibration(10 * GB, 100 * GB)}
    assert _step_balance(config, checkpoint, devices, quantize, untimed, apart) is None
