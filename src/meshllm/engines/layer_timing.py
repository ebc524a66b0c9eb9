"""Time a model's decoder layers on an engine without its weights: layers of the same shape, random.

A calibration's matmuls measure how fast a device reads weights and multiplies them; a real decode step
also runs attention over each sequence's cache, norms, rotary embeddings and the engine's own work per
sequence, and those grow with the step's sequences, not with the weights. Two random layers of the model's
shape, loaded by the engine as it loads a stage (dtype and quantization included), show what each decode
token past the first and each prompt token costs in one layer, all of that included; and what a one-token
step takes in one layer with its weights close by (an eager engine's work around its kernels shows there:
a step takes at least that in every layer, however fast the weights are read).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

from meshllm.devices import LayerShape, Precision
from meshllm.engines.base import DECODE_BATCH, Stage
from meshllm.models.checkpoint import Checkpoint
from meshllm.models.tiny import layer_checkpoint
from meshllm.step import Segment, StepInput

LAYERS = 2  # enough that a step's own work (per step, per sequence) is not all counted as a layer's
VOCAB = 64  # the timed stage's embedding and head: too small to count
REPEATS = 5  # timed decode steps of each size, after one untimed


class LayerTiming(NamedTuple):
    """What one decoder layer of a model's shape takes on a device, in seconds."""

    token: float  # what each decode token past the first adds to a step, with the threads of a shared step
    prompt: float  # a prompt token
    step: float  # a one-token decode step, its weights close by, with the threads of a step alone
    token_alone: float = 0.0  # as `token`, with the threads of a step alone (0: the same threads)


def time_layers(
    engine: str,
    shape: LayerShape,
    precision: Precision,
    device: str | None,
    threads: int | None,
    alone: int | None = None,
) -> LayerTiming:
    """Time layers of `shape`: `DECODE_BATCH` sequences of `shape.context` cached tokens each, decode steps
    of all of them and of one, on `threads` CPU threads, and again on `alone` threads (a step alone in the
    pipeline, where stages on the same cores take turns), with one-token steps alone on those."""
    from meshllm.engines import load_stage  # the engines' package imports this module's callers

    with tempfile.TemporaryDirectory(prefix="meshllm-layers-") as folder:
        checkpoint = Checkpoint.open(layer_checkpoint(Path(folder), shape, LAYERS, VOCAB))
        stage = load_stage(
            engine,
            checkpoint,
            (0, LAYERS),
            dtype=precision.dtype,
            device=device,
            quantize=precision.quantize,
            group_size=precision.group_size,
        )
        return _time(stage, shape.context, threads, alone or threads)


def _time(stage: Stage, context: int, threads: int | None, alone: int | None) -> LayerTiming:
    positions: dict[int, int] = {}
    step_ids = iter(range(1, 1 << 30))

    def step(lengths: dict[int, int]) -> float:
        """One step of `lengths[seq]` tokens of each sequence; its seconds."""
        segments = [Segment(seq, positions.get(seq, 0), n, sample=True) for seq, n in lengths.items()]
        ids = np.ones(sum(lengths.values()), dtype=np.int64)
        started = time.perf_counter()
        stage.forward(StepInput(step_id=next(step_ids), segments=segments, token_ids=ids))
        seconds = time.perf_counter() - started
        for seq, n in lengths.items():
            positions[seq] = positions.get(seq, 0) + n
        return seconds

    sequences = list(range(DECODE_BATCH))
    first = sequences[0]

    def decode_steps() -> tuple[list[float], list[float]]:
        """Seconds of decode steps of one sequence and of all of them, after an untimed pair."""
        one: list[float] = []
        many: list[float] = []
        for repeat in range(REPEATS + 1):
            timed = step({first: 1}), step(dict.fromkeys(sequences, 1))
            if repeat:  # the first of each: untimed
                one.append(timed[0])
                many.append(timed[1])
        return one, many

    try:
        if threads:
            stage.set_threads(threads)
        step({first: context})  # untimed: first calls build what the engine keeps
        prompts = [step({seq: context}) for seq in sequences[1:]]
        one, many = decode_steps()
        # One stream's steps follow each other on the threads of a step alone (switching threads between
        # steps costs some engines a step's worth).
        if alone:
            stage.set_threads(alone)
        lone = [step({first: 1}) for _ in range(REPEATS + 1)][1:]
        one_alone, many_alone = decode_steps() if alone and alone != threads else ([], [])
    finally:
        stage.release(sequences)

    def added(many: list[float], one: list[float]) -> float:
        """What each token past the first adds to one layer."""
        return max(statistics.median(many) - statistics.median(one), 0.0) / (DECODE_BATCH - 1) / LAYERS

    return LayerTiming(
        added(many, one),
        statistics.median(prompts) / context / LAYERS,
        statistics.median(lone) / LAYERS,
        added(many_alone, one_alone) if many_alone else 0.0,
    )
