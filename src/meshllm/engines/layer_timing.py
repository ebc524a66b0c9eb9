"""Time a model's decoder layers on an engine without its weights: layers of the same shape, random.

A calibration's matmuls measure how fast a device reads weights and multiplies them; a real decode step
also runs attention over each sequence's cache, norms, rotary embeddings and the engine's own work per
sequence, and those grow with the step's sequences, not with the weights. Two random layers of the model's
shape, loaded by the engine as it loads a stage (dtype and quantization included), show what each decode
token past the first and each prompt token costs in one layer, all of that included.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from meshllm.devices import LayerShape, Precision
from meshllm.engines.base import DECODE_BATCH, Stage
from meshllm.models.checkpoint import Checkpoint
from meshllm.models.tiny import layer_checkpoint
from meshllm.step import Segment, StepInput

LAYERS = 2  # enough that a step's own work (per step, per sequence) is not all counted as a layer's
VOCAB = 64  # the timed stage's embedding and head: too small to count
REPEATS = 5  # timed decode steps of each size, after one untimed


def time_layers(
    engine: str, shape: LayerShape, precision: Precision, device: str | None, threads: int | None
) -> tuple[float, float]:
    """(seconds a decode token past the first adds to one layer, seconds of a prompt token in one layer),
    with `DECODE_BATCH` sequences of `shape.context` cached tokens each, on `threads` CPU threads."""
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
        if threads:
            stage.set_threads(threads)
        return _time(stage, shape.context)


def _time(stage: Stage, context: int) -> tuple[float, float]:
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
    try:
        step({sequences[0]: context})  # untimed: first calls build what the engine keeps
        prompts = [step({seq: context}) for seq in sequences[1:]]
        one, many = [], []
        for repeat in range(REPEATS + 1):
            single = step({sequences[0]: 1})
            batch = step(dict.fromkeys(sequences, 1))
            if repeat:
                one.append(single)
                many.append(batch)
    finally:
        stage.release(sequences)
    added = (statistics.median(many) - statistics.median(one)) / (DECODE_BATCH - 1)
    return max(added, 0.0) / LAYERS, statistics.median(prompts) / context / LAYERS
