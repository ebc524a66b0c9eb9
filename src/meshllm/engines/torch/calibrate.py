"""How fast this device runs decode's costs, in the stage's dtype and quantization: reading weights
(one-token matmuls over layers too big to stay in a cache) and arithmetic (the same layers over a batch of
tokens). The planner divides each stage's bytes per token by the first; predictions use both."""

from __future__ import annotations

import time

import torch

from meshllm.devices import Calibration, Precision
from meshllm.engines.torch.qlinear import QuantizedLinear, make_linear
from meshllm.engines.torch.stage import DTYPES, pick_device

LAYERS = 8  # distinct [SIZE, SIZE] matrices, read in turn: 64 MB in bfloat16, beyond a CPU's caches
SIZE = 2048
REPEATS = 5
BATCH = 32  # tokens in the arithmetic pass: a prompt chunk, or a step of many streams


def _bytes(layer: torch.nn.Module) -> int:
    if isinstance(layer, QuantizedLinear):
        return layer.weight_bytes()
    return sum(p.numel() * p.element_size() for p in layer.parameters())


def calibrate(precision: Precision, device: str | None = None, threads: int | None = None) -> Calibration:
    """Read speed from one-token matmuls and compute rate from BATCH-token ones (medians of a few passes),
    with `threads` intra-op threads (None: the process's)."""
    if threads is None:
        return _calibrate(precision, device)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _calibrate(precision, device)
    finally:
        torch.set_num_threads(before)


@torch.inference_mode()
def _calibrate(precision: Precision, device: str | None) -> Calibration:
    target, torch_dtype = pick_device(device), DTYPES[precision.dtype]
    generator = torch.Generator().manual_seed(0)
    layers = [
        make_linear(
            torch.randn(SIZE, SIZE, generator=generator),
            None,
            precision.quantize,
            precision.group_size,
            torch_dtype,
            target,
        )
        for _ in range(LAYERS)
    ]
    held = sum(_bytes(layer) for layer in layers)
    one = _seconds(layers, torch.randn(1, SIZE, generator=generator).to(target, torch_dtype), target)
    batch = _seconds(layers, torch.randn(BATCH, SIZE, generator=generator).to(target, torch_dtype), target)
    # The batch pass reads the weights too: what it takes beyond the one-token pass is its arithmetic.
    arithmetic = max(batch - one, batch * 0.1)
    return Calibration(held / one, 2 * (BATCH - 1) * SIZE * SIZE * LAYERS / arithmetic)


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
