"""A layer's q, k and v projections as one matrix, and its gate and up projections as another.

One mat-mul over the step's tokens instead of three (or two): the activations are read, and for block
formats quantized to q8, once instead of each time, and each kernel call has more rows to split between
the threads. The rows are stacked in order (q, then k, then v; gate, then up), so the product's rows are the
three (two) products one after the other, and the graph takes them apart with views (`graph.py`). Biases
(qwen2's q/k/v) are stacked the same way. A GGUF's matrices are stacked as stored when they share a type
(block formats hold each row's blocks together, so rows stack as bytes); where they differ (llama.cpp's
mixtures keep v in another type than q and k) the layer keeps its separate matrices.
"""

from __future__ import annotations

from collections.abc import MutableMapping

import numpy as np

from meshllm.models.gguf import GgufTensor

QKV = ("q_proj", "k_proj", "v_proj")
GATE_UP = ("gate_proj", "up_proj")
FUSED = {QKV: "qkv_proj", GATE_UP: "gate_up_proj"}


def _stacked(parts: list[np.ndarray | GgufTensor]) -> np.ndarray | GgufTensor | None:
    """The parts' rows one after the other, or None when they cannot be stacked as they are held."""
    if all(isinstance(part, np.ndarray) for part in parts):
        return np.concatenate(parts, axis=0)  # type: ignore[arg-type]
    tensors = [part for part in parts if isinstance(part, GgufTensor)]
    if len(tensors) != len(parts) or len({(t.ggml_type, t.shape[1:]) for t in tensors}) != 1:
        return None
    first = tensors[0]
    return GgufTensor(
        name="+".join(t.name for t in tensors),
        ggml_type=first.ggml_type,
        type_name=first.type_name,
        shape=(sum(t.shape[0] for t in tensors), *first.shape[1:]),
        nbytes=sum(t.nbytes for t in tensors),
        data=np.concatenate([t.data for t in tensors]),
    )


def fuse_projections(arrays: MutableMapping[str, np.ndarray | GgufTensor], layers: range) -> None:
    """Replace, in place, each layer's q/k/v (`layers.{i}.self_attn.*`) and gate/up (`layers.{i}.mlp.*`)
    weights by their stacked matrix where they stack, and then their biases (all parts have one or none)."""
    for layer in layers:
        for group, fused in FUSED.items():
            module = f"layers.{layer}.{'self_attn' if group == QKV else 'mlp'}"
            for kind in ("weight", "bias"):
                names = [f"{module}.{part}.{kind}" for part in group]
                if not all(name in arrays for name in names):
                    break
                stacked = _stacked([arrays[name] for name in names])
                if stacked is None:
                    break  # the weights stay apart, and so do their biases
                for name in names:
                    del arrays[name]
                arrays[f"{module}.{fused}.{kind}"] = stacked
