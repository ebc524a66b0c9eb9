"""How fast this device reads weights the way decode does: one-token matmuls over layers too big to stay
in a cache, in the stage's dtype and quantization. The planner divides each stage's bytes per token by it."""

from __future__ import annotations

import time

import torch

from meshllm.engines.torch.qlinear import QuantizedLinear, make_linear
from meshllm.engines.torch.stage import DTYPES, pick_device

LAYERS = 8  # distinct [SIZE, SIZE] matrices, read in turn: 64 MB in bfloat16, beyond a CPU's caches
SIZE = 2048
REPEATS = 5


def _bytes(layer: torch.nn.Module) -> int:
    if isinstance(layer, QuantizedLinear):
        return layer.weight_bytes()
    return sum(p.numel() * p.element_size() for p in layer.parameters())


@torch.inference_mode()
def read_bandwidth(dtype: str, quantize: str | None, group_size: int, device: str | None = None) -> float:
    """Bytes of weights read per second by one-token matmuls (the median of a few passes)."""
    target, torch_dtype = pick_device(device), DTYPES[dtype]
    generator = torch.Generator().manual_seed(0)
    layers = [
        make_linear(
            torch.randn(SIZE, SIZE, generator=generator), None, quantize, group_size, torch_dtype, target
        )
        for _ in range(LAYERS)
    ]
    held = sum(_bytes(layer) for layer in layers)
    x = torch.randn(1, SIZE, generator=generator).to(target, torch_dtype)
    passes = []
    for _ in range(REPEATS + 1):  # the first pass warms up
        started = time.perf_counter()
        for layer in layers:
            layer(x)
        if target.type == "cuda":
            torch.cuda.synchronize()
        passes.append(time.perf_counter() - started)
    seconds = sorted(passes[1:])[len(passes[1:]) // 2]
    return held / seconds
