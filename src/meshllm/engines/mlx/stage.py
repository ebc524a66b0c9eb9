"""An MLX pipeline stage: layers `[start, end)` of a checkpoint on mlx-lm's model classes.

mlx-lm's attention runs one sequence against one cache per call, so a step runs it once per segment; the
norms and the MLP, most of a layer's weights, run once over all `T` tokens of the step.

MLX streams are per thread (MLX >= 0.31.2): every array a stage keeps between calls (weights, KV caches)
and every array it returns is evaluated before the call returns, so the next step may run on any thread.
Inputs must be numpy or torch arrays, or evaluated mx arrays: a lazy mx array made on another thread
cannot be evaluated here.
"""

from __future__ import annotations

import logging
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import KVCache

from meshllm import compute
from meshllm.defaults import DEFAULT_GROUP_SIZE
from meshllm.devices import Calibration, Precision
from meshllm.engines.base import (
    COMPUTE_MATRICES,
    DECODE_BATCH,
    Progress,
    added_rate,
    read_matrices,
    stage_bounds,
)
from meshllm.engines.mlx.loader import build_stage_model, flat_parameters
from meshllm.errors import ConfigError, StageError
from meshllm.models.checkpoint import Checkpoint
from meshllm.models.config import ModelConfig
from meshllm.step import LayerRange, StepInput, StepOutput

log = logging.getLogger(__name__)

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}

if hasattr(mx, "clear_streams"):  # MLX's streams are the thread's that made them: that thread drops them
    compute.at_exit(mx.clear_streams)


def to_mlx(array: Any) -> mx.array:
    """An mx array of a numpy array, torch tensor (bfloat16 included) or mx array."""
    if isinstance(array, mx.array):
        try:
            mx.eval(array)  # a no-op for an evaluated array
        except RuntimeError as error:
            if "Stream" not in str(error):
                raise
            raise StageError(
                "hidden states are a lazy mx array made on another thread (MLX streams are per thread); "
                "mx.eval them where they are made, or pass numpy"
            ) from None
        return array
    if type(array).__module__.startswith("torch"):
        import torch

        tensor = array.detach().cpu().contiguous()
        if tensor.dtype == torch.bfloat16:
            return mx.array(tensor.view(torch.int16).numpy()).view(mx.bfloat16)
        return mx.array(tensor.numpy())
    return mx.array(np.asarray(array))


class MlxStage:
    """Layers `[start, end)`; embeds when first; norm, lm_head and logits when last."""

    engine = "mlx"

    def __init__(
        self,
        model: nn.Module,
        config: ModelConfig,
        layer_range: LayerRange,
        is_first: bool,
        is_last: bool,
        dtype: mx.Dtype,
    ):
        self.model = model  # mlx-lm's Model, with only this stage's parts (see loader.keep_stage_parts)
        self.config = config
        self.layer_range = layer_range
        self.is_first, self.is_last = is_first, is_last
        self.dtype = dtype
        self._caches: dict[int, list[KVCache]] = {}  # seq_id -> one cache per layer of the range

    @property
    def device_type(self) -> str:
        return "metal" if mx.default_device() == mx.gpu and mx.metal.is_available() else "cpu"

    def live_sequences(self) -> int:
        return len(self._caches)

    def weight_bytes(self) -> int:
        return sum(array.nbytes for _, array in flat_parameters(self.model))

    def kv_bytes_per_token(self) -> int:
        return self.config.kv_bytes_per_token(self.layer_range.size, self.dtype.size)

    def release(self, seq_ids: list[int]) -> None:
        for seq_id in seq_ids:
            self._caches.pop(seq_id, None)

    def set_kv_memory(self, nbytes: int) -> None:
        """mlx-lm's caches grow with their sequence: nothing to bound."""

    def set_threads(self, threads: int) -> None:
        """MLX chooses its own threads (its GPU, or its CPU build's)."""

    def _cache(self, seq_id: int, start_pos: int) -> list[KVCache]:
        caches = self._caches.get(seq_id)
        if caches is None:
            if start_pos != 0:
                raise StageError(f"sequence {seq_id}: first step starts at position {start_pos}, not 0")
            caches = [KVCache() for _ in range(*self.layer_range)]
            self._caches[seq_id] = caches
        for cache in caches:
            if start_pos > cache.offset:
                raise StageError(
                    f"sequence {seq_id}: step at position {start_pos} but the cache holds {cache.offset}"
                )
            cache.trim(cache.offset - start_pos)  # a step may restart from an earlier position
        return caches

    def _inputs(self, step: StepInput) -> mx.array:
        """The step's `[1, T, hidden]` input: embedded token ids on the first stage, else hidden states."""
        if self.is_first:
            if step.token_ids is None:
                raise StageError("the first stage needs token ids")
            token_ids = mx.array(np.asarray(step.token_ids, dtype=np.int32).reshape(-1))
            hidden_states = self.model.model.embed_tokens(token_ids)
        else:
            if step.hidden_states is None:
                raise StageError("a stage after the first needs hidden states")
            hidden_states = to_mlx(step.hidden_states).astype(self.dtype)
        if hidden_states.shape[0] != step.n_tokens:
            raise StageError(
                f"step {step.step_id}: {hidden_states.shape[0]} inputs for {step.n_tokens} tokens"
            )
        return hidden_states[None]

    def forward(self, step: StepInput) -> StepOutput:
        segments = step.segments
        x = self._inputs(step)  # [1, T, hidden]
        caches = [self._cache(s.seq_id, s.start_pos) for s in segments]  # [S][layer]
        window = self.config.sliding_window
        spans, masks, offset = [], [], 0
        for segment, segment_caches in zip(segments, caches, strict=True):
            spans.append(slice(offset, offset + segment.n_tokens))
            masks.append(create_attention_mask(x[:, spans[-1]], segment_caches[0], window_size=window))
            offset += segment.n_tokens

        start, end = self.layer_range
        for index in range(start, end):
            x = self._layer(
                self.model.model.layers[index], x, spans, masks, [c[index - start] for c in caches]
            )

        states = [array for segment_caches in caches for cache in segment_caches for array in cache.state[:2]]
        if not self.is_last:
            hidden_states = x[0]  # [T, hidden]
            mx.eval(hidden_states, states)
            return StepOutput(step.step_id, segments, hidden_states=hidden_states)
        last_tokens = mx.array(np.cumsum([s.n_tokens for s in segments]) - 1)
        logits = self._logits(x[0, last_tokens]).astype(mx.float32)  # [S, vocab]
        mx.eval(logits, states)
        return StepOutput(step.step_id, segments, logits=np.array(logits))

    @staticmethod
    def _layer(
        block: nn.Module, x: mx.array, spans: list[slice], masks: list[Any], caches: list[KVCache]
    ) -> mx.array:
        """One mlx-lm decoder block over the step: attention per segment, the rest over all tokens."""
        h = block.input_layernorm(x)  # [1, T, hidden]
        attention = [
            block.self_attn(h[:, span], mask, cache)
            for span, mask, cache in zip(spans, masks, caches, strict=True)
        ]
        x = x + mx.concatenate(attention, axis=1)
        return x + block.mlp(block.post_attention_layernorm(x))

    def _logits(self, hidden_states: mx.array) -> mx.array:
        """[S, hidden] -> [S, vocab], as mlx-lm's `Model.__call__` ends."""
        hidden_states = self.model.model.norm(hidden_states)
        if self.config.tie_word_embeddings:
            return self.model.model.embed_tokens.as_linear(hidden_states)
        return self.model.lm_head(hidden_states)


DEVICES = {"auto": None, "cpu": mx.cpu, "gpu": mx.gpu, "metal": mx.gpu}


def _use_device(device: str | None) -> None:
    """Make `device` MLX's default device (for this process): None or 'auto' keep MLX's own choice."""
    if device is None or device == "auto":
        return
    if device not in DEVICES:
        raise ConfigError(f"device {device!r}: the mlx engine runs on {', '.join(DEVICES)}")
    if DEVICES[device] == mx.gpu and not mx.metal.is_available():
        raise ConfigError(f"device {device!r}: this MLX build has no Metal GPU; use device 'cpu'")
    mx.set_default_device(mx.gpu if DEVICES[device] == mx.gpu else mx.cpu)


def load_stage(
    checkpoint: Checkpoint | str,
    layer_range: tuple[int, int],
    *,
    dtype: str = "float32",
    device: str | None = None,
    progress: Progress | None = None,
    quantize: str | None = None,
    group_size: int = DEFAULT_GROUP_SIZE,
) -> MlxStage:
    """Build layers `[start, end)` of `checkpoint` on mlx-lm's classes, reading only their tensors.

    `progress(fraction)` is called once the stage's tensors are read and again once they are evaluated.
    `quantize` ('int8' or 'int4') holds the dense linear layers quantized by MLX itself, in groups of
    `group_size` inputs.
    """
    bounds = stage_bounds(checkpoint, layer_range, dtype, DTYPES, quantize)
    _use_device(device)
    checkpoint, (start, end) = bounds.checkpoint, bounds.layer_range
    config, is_first, is_last = checkpoint.config, bounds.is_first, bounds.is_last
    model = build_stage_model(
        checkpoint, (start, end), is_first, is_last, DTYPES[dtype], progress, quantize, group_size
    )
    stage = MlxStage(model, config, bounds.layer_range, is_first, is_last, DTYPES[dtype])
    log.info(
        "loaded layers [%d, %d) of %s: %.1f MB (%s on %s)",
        start,
        end,
        checkpoint.name,
        stage.weight_bytes() / 1e6,
        dtype,
        stage.device_type,
    )
    return stage


def calibrate(precision: Precision, device: str | None = None, volume: int = 0) -> Calibration:
    """Read speed from one-token matmuls over about `volume` bytes, compute rate from batch ones over a
    few, at `precision` (MLX-quantized when asked); as the torch engine measures them."""
    import time

    _use_device(device)
    size, batch = 2048, 32
    itemsize = {"int8": 1.0, "int4": 0.5}.get(precision.quantize or "", DTYPES[precision.dtype].size)
    count = read_matrices(volume, int(size * size * itemsize))
    layers: list[nn.Module] = []
    for seed in range(count):
        layer = nn.Linear(size, size, bias=False)
        layer.weight = mx.random.normal((size, size), key=mx.random.key(seed)).astype(DTYPES[precision.dtype])
        if precision.quantize is not None:
            bits = {"int8": 8, "int4": 4}[precision.quantize]
            layer = nn.QuantizedLinear.from_linear(layer, precision.group_size, bits)
        layers.append(layer)
    mx.eval([layer.parameters() for layer in layers])
    held = sum(array.nbytes for layer in layers for _, array in flat_parameters(layer))

    def seconds(tokens: int, layers: list[nn.Module]) -> float:
        x = mx.random.normal((tokens, size)).astype(DTYPES[precision.dtype])
        passes = []
        for _ in range(6):
            started = time.perf_counter()
            mx.eval([layer(x) for layer in layers])
            passes.append(time.perf_counter() - started)
        return sorted(passes[1:])[2]

    few = layers[:COMPUTE_MATRICES]
    read, one, many = seconds(1, layers), seconds(1, few), seconds(batch, few)
    return Calibration(
        held / read,
        added_rate(batch, size * size * len(few), one, many),
        decode_flop_rate=added_rate(
            DECODE_BATCH, size * size * len(layers), read, seconds(DECODE_BATCH, layers)
        ),
    )
