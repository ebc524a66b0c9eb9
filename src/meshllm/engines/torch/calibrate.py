"""How fast this device runs decode's costs, in the stage's dtype and quantization: reading weights
(one-token matmuls over as many bytes as the stages will hold, at least 64 MB in bfloat16), arithmetic
(a few of those layers over a batch of tokens, as a prompt chunk computes), and the arithmetic a decode
step of many streams adds (DECODE_BATCH-token matmuls over all of them: weights streamed from memory,
which leaves a CPU less compute than cached ones). The planner divides each stage's bytes per token by
the first; predictions use all three."""

from __future__ import annotations

import copy
import time

import torch

from meshllm.devices import Calibration, Precision
from meshllm.engines.base import COMPUTE_MATRICES, DECODE_BATCH, added_rate, read_matrices
from meshllm.engines.torch.qlinear import QuantizedLinear, make_linear
from meshllm.engines.torch.stage import DTYPES, pick_device

SIZE = 2048
REPEATS = 5
BATCH = 32  # tokens in the arithmetic pass: a prompt chunk, or a step of many streams


def _bytes(layer: torch.nn.Module) -> int:
    if isinstance(layer, QuantizedLinear):
        return layer.weight_bytes()
    return sum(p.numel() * p.element_size() for p in layer.parameters())


def calibrate(
    precision: Precision,
    device: str | None = None,
    threads: int | None = None,
    volume: int = 0,
    alone: int | None = None,
) -> Calibration:
    """Read speed from one-token matmuls over about `volume` bytes of weights, and compute rate from
    BATCH-token ones over a few (medians of a few passes), with `threads` intra-op threads (None: the
    process's); with `alone`, the read speed again with that many (the same weights, timed twice)."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _calibrate(precision, device, volume, alone)
    finally:
        torch.set_num_threads(before)


@torch.inference_mode()
def _calibrate(precision: Precision, device: str | None, volume: int, alone: int | None) -> Calibration:
    target, torch_dtype = pick_device(device), DTYPES[precision.dtype]
    generator = torch.Generator().manual_seed(0)
    first = make_linear(
        torch.randn(SIZE, SIZE, generator=generator),
        None,
        precision.quantize,
        precision.group_size,
        torch_dtype,
        target,
    )
    # Copies of one layer: distinct memory to read, made without drawing or quantizing again.
    layers = [first] + [copy.deepcopy(first) for _ in range(read_matrices(volume, _bytes(first)) - 1)]
    held = sum(_bytes(layer) for layer in layers)
    x = torch.randn(BATCH, SIZE, generator=generator).to(target, torch_dtype)
    read, decode = _seconds(layers, x[:1], target), _seconds(layers, x[:DECODE_BATCH], target)
    few = layers[:COMPUTE_MATRICES]
    one, batch = _seconds(few, x[:1], target), _seconds(few, x, target)
    measured = Calibration(
        held / read,
        added_rate(BATCH, SIZE * SIZE * len(few), one, batch),
        decode_flop_rate=added_rate(DECODE_BATCH, SIZE * SIZE * len(layers), read, decode),
    )
    if alone is None or alone == torch.get_num_threads():
        return measured
    torch.set_num_threads(alone)
    return measured._replace(alone_read_bandwidth=held / _seconds(layers, x[:1], target))


def _seconds(layers: list[torch.nn.Module], x: torch.Tensor, target: torch.device) -> float:
    passes = []
    for _ in range(REPEATS + 1):  # the first pass warms up
        started = time.perf_counter()
        for layer in layers:
            layer(x)
        if target.type == "cuda":
            torch.cuda.synchronize()
        passes.append(time.perf_counter() - started)
    return sorted(passes[1:])[len(passes[1:]) // 2]
