"""A PyTorch pipeline stage: layers `[start, end)` of a checkpoint, with one KV cache per live sequence."""

from __future__ import annotations

import logging

import numpy as np
import torch

from meshllm.defaults import DEFAULT_GROUP_SIZE
from meshllm.engines.base import Progress, stage_bounds
from meshllm.engines.torch.kv import POOL_POSITIONS, KVPools, SequenceKV, step_kv
from meshllm.engines.torch.llama import StageModel, rope_inv_freq
from meshllm.engines.torch.qlinear import QuantizedLinear
from meshllm.engines.torch.weights import read_tensors, stage_tensor_names
from meshllm.errors import ConfigError, StageError
from meshllm.models.checkpoint import Checkpoint
from meshllm.step import LayerRange, StepInput, StepOutput

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(device: str | None = None) -> torch.device:
    if device and device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


class TorchStage:
    """Layers `[start, end)`; embeds when first; norm, lm_head and logits when last."""

    engine = "torch"

    def __init__(self, model: StageModel, layer_range: LayerRange, is_first: bool, is_last: bool):
        self.model = model
        self.config = model.config
        self.layer_range = layer_range
        self.is_first, self.is_last = is_first, is_last
        param = next(model.parameters())
        self.dtype, self.device = param.dtype, param.device
        self._pools = KVPools(
            range(*layer_range),
            self.config.num_key_value_heads,
            self.config.head_dim,
            self.dtype,
            self.device,
        )
        self._caches: dict[int, SequenceKV] = {}  # seq_id -> its slot in the pools

    @property
    def device_type(self) -> str:
        return self.device.type

    def live_sequences(self) -> int:
        return len(self._caches)

    def weight_bytes(self) -> int:
        """Parameters (each shared one once) and the packed weights of quantized layers."""
        unique = {id(p): p for p in self.model.parameters()}
        packed = sum(m.weight_bytes() for m in self.model.modules() if isinstance(m, QuantizedLinear))
        return sum(p.numel() * p.element_size() for p in unique.values()) + packed

    def kv_bytes_per_token(self) -> int:
        return self.config.kv_bytes_per_token(self.layer_range.size, self.dtype.itemsize)

    def release(self, seq_ids: list[int]) -> None:
        for seq_id in seq_ids:
            cache = self._caches.pop(seq_id, None)
            if cache is not None:
                cache.release()

    def set_threads(self, threads: int) -> None:
        torch.set_num_threads(threads)  # the process's intra-op threads: one stage computes at a time

    def set_kv_memory(self, nbytes: int) -> None:
        """A pool holds no more positions than the KV memory allows (at least one slot)."""
        self._pools.positions = min(POOL_POSITIONS, nbytes // max(1, self.kv_bytes_per_token()))

    def kv_bytes(self) -> int:
        """What the pools hold now, free slots included."""
        return self._pools.bytes()

    def _cache(self, seq_id: int, start_pos: int, n_tokens: int) -> SequenceKV:
        cache = self._caches.get(seq_id)
        if cache is None:
            if start_pos != 0:
                raise StageError(f"sequence {seq_id}: first step starts at position {start_pos}, not 0")
            cache = self._caches[seq_id] = SequenceKV(self._pools, n_tokens)
        if start_pos > cache.offset:
            raise StageError(
                f"sequence {seq_id}: step at position {start_pos} but the cache holds {cache.offset}"
            )
        cache.truncate(start_pos)  # a step may restart from an earlier position
        cache.reserve(start_pos + n_tokens)
        return cache

    @torch.inference_mode()
    def forward(self, step: StepInput) -> StepOutput:
        segments = step.segments
        positions = torch.cat([torch.arange(s.start_pos, s.start_pos + s.n_tokens) for s in segments]).to(
            self.device
        )
        if self.is_first:
            if step.token_ids is None:
                raise StageError("the first stage needs token ids")
            hidden_states = torch.as_tensor(np.asarray(step.token_ids), dtype=torch.long, device=self.device)
        else:
            if step.hidden_states is None:
                raise StageError("a stage after the first needs hidden states")
            hidden_states = torch.as_tensor(step.hidden_states).to(self.device, self.dtype)
        if hidden_states.shape[0] != positions.shape[0]:
            raise StageError(
                f"step {step.step_id}: {hidden_states.shape[0]} inputs for {positions.shape[0]} tokens"
            )

        caches = [self._cache(s.seq_id, s.start_pos, s.n_tokens) for s in segments]
        kv = step_kv(segments, caches, self.config.sliding_window)
        hidden_states = self.model(hidden_states, positions, segments, kv)
        for segment, cache in zip(segments, caches, strict=True):
            cache.advance(segment.start_pos + segment.n_tokens)
        if not self.is_last:
            return StepOutput(step.step_id, segments, hidden_states=hidden_states)
        last_tokens = torch.tensor(np.cumsum([s.n_tokens for s in segments]) - 1, device=self.device)
        logits = self.model.logits(hidden_states[last_tokens])  # [S, vocab]
        return StepOutput(step.step_id, segments, logits=logits.float().cpu().numpy())


def _group_by_layer(names: list[str]) -> list[list[str]]:
    """Tensor names grouped by layer (and the embedding, norm, lm_head each on their own), in order."""
    groups: dict[str, list[str]] = {}
    for name in names:
        parts = name.split(".")
        # a layer's tensors together; elsewhere a module's (its weight with a quantized weight's scales)
        key = ".".join(parts[:3]) if name.startswith("model.layers.") else ".".join(parts[:-1])
        groups.setdefault(key, []).append(name)
    return list(groups.values())


def load_stage(
    checkpoint: Checkpoint | str,
    layer_range: tuple[int, int],
    *,
    dtype: str = "float32",
    device: str | None = None,
    progress: Progress | None = None,
    quantize: str | None = None,
    group_size: int = DEFAULT_GROUP_SIZE,
) -> TorchStage:
    """Build layers `[start, end)` of `checkpoint`, reading only their tensors from disk.

    `progress(fraction)` is called after each layer's tensors are read.
    """
    bounds = stage_bounds(checkpoint, layer_range, dtype, DTYPES, quantize)
    checkpoint, (start, end) = bounds.checkpoint, bounds.layer_range
    config, is_first, is_last = checkpoint.config, bounds.is_first, bounds.is_last
    torch_dtype, target = DTYPES[dtype], pick_device(device)

    inv_freq = rope_inv_freq(config)  # a buffer, not in the checkpoint: made here, not on meta
    with torch.device("meta"):  # no random init: every parameter is assigned from the checkpoint
        model = StageModel(config, (start, end), is_first, is_last, inv_freq=inv_freq)
    names = stage_tensor_names(checkpoint, (start, end), is_first, is_last)
    groups = _group_by_layer(list(names))
    if quantize is not None or config.quantization:
        from meshllm.engines.torch.quantized_load import load_quantized

        load_quantized(
            model,
            checkpoint,
            names,
            groups,
            torch_dtype,
            target,
            quantize,
            group_size,
            progress,
        )
        model.eval()
        return _loaded(TorchStage(model, bounds.layer_range, is_first, is_last), checkpoint, dtype, quantize)
    tensors: dict[str, torch.Tensor] = {}
    for index, group in enumerate(groups):
        tensors.update(read_tensors(checkpoint, group, torch_dtype))
        if progress is not None:
            progress((index + 1) / len(groups))
    state = {names[name]: tensor for name, tensor in tensors.items() if name in names}
    tied = is_last and config.tie_word_embeddings
    if tied:
        # The embedding matrix is the lm_head (a checkpoint that also saves lm_head.weight has it equal).
        embedding = state.get("embed_tokens.weight") if is_first else state.pop("embed_tokens.weight", None)
        if embedding is not None:
            state["lm_head.weight"] = embedding
    expected = set(model.state_dict())
    missing = sorted(expected - set(state))
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise ConfigError(
            f"{checkpoint.path}: tensor {_checkpoint_name(missing[0], tied)!r}{more} "
            "missing from the checkpoint's safetensors files"
        )
    model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=True, assign=True)
    if tied and is_first:
        assert model.lm_head is not None and model.embed_tokens is not None  # first and last: both built
        model.lm_head.weight = model.embed_tokens.weight  # one shared matrix, not two copies of it
    model.to(target)
    model.eval()
    model.fuse()
    return _loaded(TorchStage(model, bounds.layer_range, is_first, is_last), checkpoint, dtype, None)


def _loaded(stage: TorchStage, checkpoint: Checkpoint, dtype: str, quantize: str | None) -> TorchStage:
    held = f"{dtype}, linear layers {quantize}" if quantize else dtype
    log.info(
        "loaded layers %s of %s: %.1f MB (%s on %s)",
        stage.layer_range,
        checkpoint.name,
        stage.weight_bytes() / 1e6,
        held,
        stage.device,
    )
    return stage


def _checkpoint_name(stage_name: str, tied: bool) -> str:
    """The checkpoint tensor a stage parameter is read from (the inverse of `stage_tensor_names`)."""
    if stage_name.startswith("lm_head."):
        return "model.embed_tokens.weight" if tied else stage_name
    return f"model.{stage_name}"
