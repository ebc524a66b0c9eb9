"""One-token GEMV time of a linear layer: bfloat16 against int8 and int4 weights (groups of 32, 64, 128).

Decode multiplies one token's activations by every weight of the stage once, so its speed is the rate at
which weights stream from memory. For a [3072, 1024] layer (an MLP projection of a Qwen3-0.6B-shaped
model) and a [151936, 1024] one (its lm_head), with 1 and 2 threads, prints the median time of a
`[1, in] @ w.T` and the rate of weight bytes read (packed weights plus scales and zeros). A small layer
fits in the CPU's cache, so each one is copied until the copies exceed 256 MB and the calls cycle through
them, as a decode step does through its layers.

    .venv/bin/python bench/qlinear_gemv.py [--repeats 7] [--json]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time

import torch
from torch import nn

from meshllm.engines.torch.qlinear import make_linear

SHAPES = [(3072, 1024), (151936, 1024)]
KINDS = [("bf16", None, 0), ("int8", "int8", 0), ("int4-g32", "int4", 32), ("int4-g64", "int4", 64)]
KINDS += [("int4-g128", "int4", 128)]
COLD_BYTES = 256 * 2**20  # well past the last-level cache


def layer_bytes(layer: nn.Module) -> int:
    tensors = list(layer.parameters()) + list(layer.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


@torch.inference_mode()
def time_once(layers: list[nn.Module], x: torch.Tensor) -> float:
    """Seconds per `[1, in]` GEMV over at least about 20 calls, cycling through the copies."""
    rounds = max(1, 20 // len(layers))
    start = time.perf_counter()
    for _ in range(rounds):
        for layer in layers:
            layer(x)
    return (time.perf_counter() - start) / (rounds * len(layers))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    print(f"torch {torch.__version__}, median of {args.repeats} repeats, one token ([1, in] @ w.T)")
    print(f"{'shape':>14}  {'weights':>9}  {'MB':>7}  {'threads':>7}  {'ms':>8}  {'GB/s':>6}  {'vs bf16':>7}")
    for out_features, in_features in SHAPES:
        weight = torch.randn(out_features, in_features, dtype=torch.bfloat16) * 0.02
        copies: dict[str, list[nn.Module]] = {}
        for kind, mode, group_size in KINDS:
            layer = make_linear(weight, None, mode, group_size or 64, torch.bfloat16, "cpu", kind)
            copies[kind] = [layer] + [copy.deepcopy(layer) for _ in range(COLD_BYTES // layer_bytes(layer))]
        x = torch.randn(1, in_features, dtype=torch.bfloat16)
        for threads in args.threads:
            torch.set_num_threads(threads)
            timings: dict[str, list[float]] = {kind: [] for kind in copies}
            for layers in copies.values():
                time_once(layers[:3], x)  # warm up
            for _ in range(args.repeats):  # the kinds in turn, so a change of load touches them all
                for kind, layers in copies.items():
                    timings[kind].append(time_once(layers, x))
            bf16_seconds = statistics.median(timings["bf16"])
            for kind, layers in copies.items():
                seconds = statistics.median(timings[kind])
                nbytes = layer_bytes(layers[0])
                row = {
                    "shape": [out_features, in_features],
                    "weights": kind,
                    "bytes": nbytes,
                    "threads": threads,
                    "ms": round(seconds * 1e3, 4),
                    "gb_per_s": round(nbytes / seconds / 1e9, 2),
                }
                rows.append(row)
                print(
                    f"{str(row['shape']):>14}  {kind:>9}  {nbytes / 1e6:>7.1f}  {threads:>7}  "
                    f"{row['ms']:>8.3f}  {row['gb_per_s']:>6.1f}  {bf16_seconds / seconds:>6.2f}x"
                )
        del copies
    if args.json:
        print(json.dumps({"torch": torch.__version__, "results": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
