"""A ggml pipeline stage: layers `[start, end)` of a Llama-family checkpoint as a ggml graph on the CPU.

ggml (the tensor library under llama.cpp) is driven through its Python bindings, `ggml-python`. The
stage holds its weights in ggml backend buffers, in float32, float16 or bfloat16, or quantized at
load to ggml's block formats (`quantize="int8"` → q8_0, `"int4"` → q4_0: blocks of 32 weights, one scale
each). A step is one graph: every linear layer runs once over the `T` tokens of the step; attention runs
per segment, against that sequence's cache. The variants are fields of `ModelConfig`, as in the torch
engine: q/k/v bias (qwen2), per-head q/k RMSNorm (qwen3), tied embeddings, RoPE scaling (as ggml's
per-frequency factors), a sliding window (mistral).

ggml tensors list their dimensions fastest first: a `[T, hidden]` numpy array is a `[hidden, T]` ggml
tensor over the same memory, and a checkpoint's `[out, in]` weight is a `[in, out]` ggml matrix.

KV caches are float32 numpy arrays, one pair per sequence and layer; each step passes a sequence's
cached keys and values in as graph inputs and appends the step's new ones after the compute.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from meshllm.defaults import DEFAULT_GROUP_SIZE
from meshllm.devices import Calibration, Precision
from meshllm.engines.base import Progress, kv_bytes_per_token, stage_bounds
from meshllm.errors import ConfigError, StageError
from meshllm.models.checkpoint import Checkpoint
from meshllm.models.config import ModelConfig
from meshllm.models.rope import inverse_frequencies
from meshllm.step import LayerRange, Segment, StepInput, StepOutput

log = logging.getLogger(__name__)

DTYPES = ("float32", "float16", "bfloat16")
QUANT_BLOCK = 32  # weights per q8_0 / q4_0 block: the row length must be a multiple of it
ROPE_NEOX = 2  # GGML_ROPE_TYPE_NEOX: rotate the two halves of a head, as Hugging Face's rotate_half
LOG_WARN = 3  # GGML_LOG_LEVEL_WARN


def ggml_module() -> Any:
    """The bindings, with ggml's log below warnings dropped (the log callback is kept referenced)."""
    import ggml  # type: ignore[import-not-found,unused-ignore]

    if not getattr(ggml_module, "callback", None):

        def write(level: int, text: bytes | None, _user: Any) -> None:
            if level >= LOG_WARN and text:
                log.warning("ggml: %s", text.decode(errors="replace").rstrip())

        callback = ggml.ggml_log_callback(write)
        ggml.ggml_log_set(callback, None)
        ggml_module.callback = callback  # type: ignore[attr-defined]
    return ggml


def weight_type(g: Any, dtype: str, quantize: str | None) -> int:
    if quantize == "int8":
        return int(g.GGML_TYPE_Q8_0)
    if quantize == "int4":
        return int(g.GGML_TYPE_Q4_0)
    return int({"float32": g.GGML_TYPE_F32, "float16": g.GGML_TYPE_F16, "bfloat16": g.GGML_TYPE_BF16}[dtype])


def rope_freq_factors(config: ModelConfig) -> np.ndarray:
    """ggml's RoPE takes per-frequency divisors of the default angles: the default inverse frequencies
    over the checkpoint's (with its `rope_scaling`), `[head_dim / 2]`."""
    inv_freq, scaled = inverse_frequencies(config)
    return (inv_freq / scaled).astype(np.float32)


def as_numpy(array: Any) -> np.ndarray:
    """A float32 `[T, hidden]` numpy array of hidden states from numpy, torch or mlx."""
    if type(array).__module__.startswith("torch"):
        return np.ascontiguousarray(array.detach().float().cpu().numpy())
    return np.ascontiguousarray(np.asarray(array, dtype=np.float32))


@dataclass
class SequenceCache:
    """One sequence's keys and values for each layer of the stage, `[capacity, H_kv, D]` float32."""

    keys: list[np.ndarray]
    values: list[np.ndarray]
    offset: int = 0

    def append(self, layer: int, keys: np.ndarray, values: np.ndarray, start: int) -> None:
        end = start + keys.shape[0]
        if end > self.keys[layer].shape[0]:
            capacity = max(end, 2 * self.keys[layer].shape[0], 64)
            for store in (self.keys, self.values):
                grown = np.empty((capacity, *store[layer].shape[1:]), dtype=np.float32)
                grown[:start] = store[layer][:start]
                store[layer] = grown
        self.keys[layer][start:end] = keys
        self.values[layer][start:end] = values


@dataclass
class Weights:
    """The stage's ggml tensors by stage parameter name (`layers.{i}.…`, `embed_tokens.weight`, …)."""

    tensors: dict[str, Any] = field(default_factory=dict)
    nbytes: int = 0
    placement: dict[str, int] = field(default_factory=dict)  # buffer type name -> tensors held in it


class GgmlStage:
    """Layers `[start, end)`; embeds when first; norm, lm_head and logits when last."""

    engine = "ggml"
    backend: Any = None

    def __init__(
        self,
        config: ModelConfig,
        layer_range: LayerRange,
        is_first: bool,
        is_last: bool,
        arrays: dict[str, np.ndarray],  # stage parameter name -> float32 array, as in the checkpoint
        dtype: str,
        quantize: str | None,
        threads: int | None = None,
    ):
        self.g = g = ggml_module()
        self.config = config
        self.layer_range = layer_range
        self.is_first, self.is_last = is_first, is_last
        self.dtype, self.quantize = dtype, quantize
        self.threads = threads or int(os.environ.get("OMP_NUM_THREADS") or 0) or os.cpu_count() or 1
        self._buffers: list[tuple[Any, Any]] = []  # (tensor context, backend buffer) per buffer type
        self.backend = g.ggml_backend_cpu_init()
        if not self.backend:
            raise StageError("ggml: the CPU backend did not start")
        g.ggml_backend_cpu_set_n_threads(self.backend, self.threads)
        self.freq_factors = rope_freq_factors(config)
        self.weights = self._upload(arrays, weight_type(g, dtype, quantize))
        self._caches: dict[int, SequenceCache] = {}

    @property
    def device_type(self) -> str:
        return "cpu"

    def live_sequences(self) -> int:
        return len(self._caches)

    def weight_bytes(self) -> int:
        return self.weights.nbytes

    def kv_bytes_per_token(self) -> int:
        return kv_bytes_per_token(self.config, self.layer_range, 4)  # float32 caches

    def release(self, seq_ids: list[int]) -> None:
        for seq_id in seq_ids:
            self._caches.pop(seq_id, None)

    def close(self) -> None:
        g = self.g
        for ctx, buffer in self._buffers:
            g.ggml_backend_buffer_free(buffer)
            g.ggml_free(ctx)
        self._buffers = []
        if self.backend:
            g.ggml_backend_free(self.backend)
            self.backend = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # the interpreter may be shutting down
            pass

    def extra_buffer_types(self) -> list[Any]:
        """The CPU backend's extra buffer types (AMX, CPU_REPACK, ... as this build and CPU have them), in
        the order llama.cpp tries them: layouts the quantized mat-mul kernels read fastest."""
        g = self.g
        device = g.ggml_backend_get_device(self.backend)
        registry = g.ggml_backend_dev_backend_reg(device)
        address = g.ggml_backend_reg_get_proc_address(registry, b"ggml_backend_dev_get_extra_bufts")
        if not address:
            return []
        listed = ctypes.CFUNCTYPE(ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)(address)(device)
        found: list[Any] = []
        while listed[len(found)]:
            found.append(listed[len(found)])
        return found

    def _takes(self, buft: Any, kind: int, columns: int, rows: int) -> bool:
        """Whether `buft` takes a mat-mul of such a weight by float32 activations: llama.cpp's own test, a
        mul_mat node whose weight sits in an empty buffer of that type, asked of the device."""
        g = self.g
        ctx = g.ggml_init(
            g.ggml_init_params(mem_size=g.ggml_tensor_overhead() * 4, mem_buffer=None, no_alloc=True)
        )
        probe = g.ggml_backend_buft_alloc_buffer(buft, 0)
        try:
            weight = g.ggml_new_tensor_2d(ctx, kind, columns, rows)
            op = g.ggml_mul_mat(ctx, weight, g.ggml_new_tensor_2d(ctx, g.GGML_TYPE_F32, columns, 2))
            weight.contents.buffer = probe
            return bool(g.ggml_backend_dev_supports_op(g.ggml_backend_get_device(self.backend), op))
        finally:
            g.ggml_backend_buffer_free(probe)
            g.ggml_free(ctx)

    def _upload(self, arrays: dict[str, np.ndarray], matrix_type: int) -> Weights:
        """Every parameter into backend buffers: matrices in `matrix_type`, vectors in float32. Quantized
        matrices go, as in llama.cpp, into the first extra buffer type that takes their mat-mul (the AMX
        or repacked layouts), except the embedding table, which is looked up (get_rows), not multiplied."""
        g = self.g
        blocked = g.ggml_blck_size(matrix_type) > 1
        plain = g.ggml_backend_get_default_buffer_type(self.backend)
        # not AMX's: its kernels crashed on this engine's graphs (a mat-mul over several tokens, tiny rows)
        extra = (
            [b for b in self.extra_buffer_types() if g.ggml_backend_buft_name(b) != b"AMX"] if blocked else []
        )
        placed: dict[int, tuple[Any, list[tuple[str, np.ndarray, int]]]] = {}
        for name, array in arrays.items():
            array = np.ascontiguousarray(array, dtype=np.float32)
            kind = matrix_type if array.ndim == 2 else int(g.GGML_TYPE_F32)
            buft = plain
            if kind != g.GGML_TYPE_F32 and blocked:
                if array.shape[1] % QUANT_BLOCK:
                    raise ConfigError(
                        f"{name}: rows of {array.shape[1]} weights cannot be held in ggml blocks of {QUANT_BLOCK}"
                    )
                if name != "embed_tokens.weight":
                    rows, columns = array.shape
                    buft = next((b for b in extra if self._takes(b, kind, columns, rows)), plain)
            placed.setdefault(int(buft), (buft, []))[1].append((name, array, kind))
        weights = Weights()
        for buft, members in placed.values():
            ctx = g.ggml_init(
                g.ggml_init_params(
                    mem_size=g.ggml_tensor_overhead() * (len(members) + 4), mem_buffer=None, no_alloc=True
                )
            )
            tensors = []
            for name, array, kind in members:
                if array.ndim == 2:
                    tensor = g.ggml_new_tensor_2d(ctx, kind, array.shape[1], array.shape[0])
                else:
                    tensor = g.ggml_new_tensor_1d(ctx, kind, array.shape[0])
                g.ggml_set_name(tensor, name.encode()[:63])
                weights.tensors[name] = tensor
                tensors.append(tensor)
            buffer = g.ggml_backend_alloc_ctx_tensors_from_buft(ctx, buft)
            if not buffer:
                g.ggml_free(ctx)
                raise StageError("ggml: could not allocate the stage's weights")
            self._buffers.append((ctx, buffer))
            g.ggml_backend_buffer_set_usage(buffer, g.GGML_BACKEND_BUFFER_USAGE_WEIGHTS)
            weights.placement[g.ggml_backend_buft_name(buft).decode()] = len(members)
            for tensor, (_, array, kind) in zip(tensors, members, strict=True):
                data = array if kind == g.GGML_TYPE_F32 else self._encode(array, kind)
                g.ggml_backend_tensor_set(tensor, data.ctypes.data_as(ctypes.c_void_p), 0, data.nbytes)
                weights.nbytes += data.nbytes
        return weights

    def _encode(self, array: np.ndarray, kind: int) -> np.ndarray:
        """A float32 `[rows, columns]` matrix in ggml type `kind` (f16, bf16 or a block format)."""
        g = self.g
        rows, columns = array.shape
        data = np.empty(g.ggml_row_size(kind, columns) * rows, dtype=np.uint8)
        g.ggml_quantize_chunk(
            kind,
            array.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
            data.ctypes.data_as(ctypes.c_void_p),
            0,
            rows,
            columns,
            None,
        )
        return data

    def _cache(self, seq_id: int, start_pos: int) -> SequenceCache:
        cache = self._caches.get(seq_id)
        if cache is None:
            if start_pos != 0:
                raise StageError(f"sequence {seq_id}: first step starts at position {start_pos}, not 0")
            shape = (0, self.config.num_key_value_heads, self.config.head_dim)
            layers = self.layer_range.size
            cache = SequenceCache(
                [np.empty(shape, np.float32) for _ in range(layers)],
                [np.empty(shape, np.float32) for _ in range(layers)],
            )
            self._caches[seq_id] = cache
        if start_pos > cache.offset:
            raise StageError(
                f"sequence {seq_id}: step at position {start_pos} but the cache holds {cache.offset}"
            )
        cache.offset = start_pos  # a step may restart from an earlier position
        return cache

    def forward(self, step: StepInput) -> StepOutput:
        segments = step.segments
        n_tokens = sum(s.n_tokens for s in segments)
        inputs: np.ndarray
        if self.is_first:
            if step.token_ids is None:
                raise StageError("the first stage needs token ids")
            inputs = np.asarray(step.token_ids).reshape(-1).astype(np.int32)
            if inputs.size and (inputs.min() < 0 or inputs.max() >= self.config.vocab_size):
                raise StageError(f"step {step.step_id}: a token id outside the vocabulary")
        else:
            if step.hidden_states is None:
                raise StageError("a stage after the first needs hidden states")
            inputs = as_numpy(step.hidden_states)
            if inputs.ndim != 2 or inputs.shape[1] != self.config.hidden_size:
                raise StageError(f"step {step.step_id}: hidden states of shape {inputs.shape}")
        if inputs.shape[0] != n_tokens:
            raise StageError(f"step {step.step_id}: {inputs.shape[0]} inputs for {n_tokens} tokens")
        caches = [self._cache(s.seq_id, s.start_pos) for s in segments]
        if len({s.seq_id for s in segments}) != len(segments):
            raise StageError(f"step {step.step_id}: a sequence in more than one segment")
        result, new_kv = StepGraph(self, segments, caches, inputs).run()
        offset = 0
        for segment, cache in zip(segments, caches, strict=True):
            span = slice(offset, offset + segment.n_tokens)
            for layer, (keys, values) in enumerate(new_kv):
                cache.append(layer, keys[span], values[span], segment.start_pos)
            cache.offset = segment.start_pos + segment.n_tokens
            offset += segment.n_tokens
        if not self.is_last:
            return StepOutput(step.step_id, segments, hidden_states=result)
        return StepOutput(step.step_id, segments, logits=result)


class StepGraph:
    """One step as one ggml graph: built, allocated, given its inputs, computed and read, then freed."""

    def __init__(
        self, stage: GgmlStage, segments: list[Segment], caches: list[SequenceCache], inputs: np.ndarray
    ):
        self.stage, self.g = stage, stage.g
        self.segments, self.caches = segments, caches
        self.config = stage.config
        g = self.g
        n_nodes = 256 + stage.layer_range.size * (64 + 32 * len(segments))
        self.ctx = g.ggml_init(
            g.ggml_init_params(
                mem_size=g.ggml_tensor_overhead() * n_nodes + g.ggml_graph_overhead_custom(n_nodes, False),
                mem_buffer=None,
                no_alloc=True,
            )
        )
        self.n_nodes = n_nodes
        self.feeds: list[tuple[Any, np.ndarray]] = []  # graph inputs and the arrays they are set from
        self.inputs = inputs

    def input(self, array: np.ndarray) -> Any:
        """A graph input holding `array` (float32 or int32, C order: its last axis is ggml's ne0)."""
        g = self.g
        kind = g.GGML_TYPE_I32 if array.dtype == np.int32 else g.GGML_TYPE_F32
        array = np.ascontiguousarray(array)
        ne = list(reversed(array.shape))
        if len(ne) == 1:
            tensor = g.ggml_new_tensor_1d(self.ctx, kind, ne[0])
        elif len(ne) == 2:
            tensor = g.ggml_new_tensor_2d(self.ctx, kind, ne[0], ne[1])
        else:
            tensor = g.ggml_new_tensor_3d(self.ctx, kind, ne[0], ne[1], ne[2])
        g.ggml_set_input(tensor)
        self.feeds.append((tensor, array))
        return tensor

    def weight(self, name: str) -> Any:
        return self.stage.weights.tensors[name]

    def linear(self, x: Any, prefix: str) -> Any:
        g, tensors = self.g, self.stage.weights.tensors
        y = g.ggml_mul_mat(self.ctx, tensors[f"{prefix}.weight"], x)
        bias = tensors.get(f"{prefix}.bias")
        return y if bias is None else g.ggml_add(self.ctx, y, bias)

    def norm(self, x: Any, name: str) -> Any:
        g = self.g
        return g.ggml_mul(self.ctx, g.ggml_rms_norm(self.ctx, x, self.config.rms_norm_eps), self.weight(name))

    def mask(self, segment: Segment) -> np.ndarray:
        """`[n, start_pos + n]` additive mask: query i (at start_pos + i) sees keys up to itself (and the
        window)."""
        n, start = segment.n_tokens, segment.start_pos
        query = np.arange(start, start + n)[:, None]
        key = np.arange(start + n)[None, :]
        seen = key <= query
        window = self.config.sliding_window
        if window is not None:
            seen &= key > query - window
        return np.where(seen, 0.0, -np.inf).astype(np.float32)

    def attention(self, layer: int, local: int, x: Any, positions: Any, factors: Any) -> tuple[Any, Any, Any]:
        """The attention block's output `[H * D, T]`, and the step's new keys and values `[D, H_kv, T]`."""
        g, ctx, config = self.g, self.ctx, self.config
        heads, kv_heads, dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        n_total = self.inputs.shape[0]
        prefix = f"layers.{layer}.self_attn"
        q = g.ggml_reshape_3d(ctx, self.linear(x, f"{prefix}.q_proj"), dim, heads, n_total)
        k = g.ggml_reshape_3d(ctx, self.linear(x, f"{prefix}.k_proj"), dim, kv_heads, n_total)
        v = g.ggml_reshape_3d(ctx, self.linear(x, f"{prefix}.v_proj"), dim, kv_heads, n_total)
        if config.qk_norm:
            q, k = self.norm(q, f"{prefix}.q_norm.weight"), self.norm(k, f"{prefix}.k_norm.weight")
        rope = (dim, ROPE_NEOX, 0, config.rope_theta, 1.0, 0.0, 1.0, 0.0, 0.0)
        q = g.ggml_rope_ext(ctx, q, positions, factors, *rope)
        k = g.ggml_cont(ctx, g.ggml_rope_ext(ctx, k, positions, factors, *rope))
        v = g.ggml_cont(ctx, v)
        g.ggml_set_output(k)
        g.ggml_set_output(v)
        outputs = None
        offset = 0
        for segment, cache in zip(self.segments, self.caches, strict=True):
            n = segment.n_tokens
            qs = g.ggml_view_3d(
                ctx, q, dim, heads, n, q.contents.nb[1], q.contents.nb[2], offset * q.contents.nb[2]
            )
            ks = g.ggml_view_3d(
                ctx, k, dim, kv_heads, n, k.contents.nb[1], k.contents.nb[2], offset * k.contents.nb[2]
            )
            vs = g.ggml_view_3d(
                ctx, v, dim, kv_heads, n, v.contents.nb[1], v.contents.nb[2], offset * v.contents.nb[2]
            )
            past = segment.start_pos
            if past:
                ks = g.ggml_concat(ctx, self.input(cache.keys[local][:past]), ks, 2)
                vs = g.ggml_concat(ctx, self.input(cache.values[local][:past]), vs, 2)
            keys = g.ggml_cont(ctx, g.ggml_permute(ctx, ks, 0, 2, 1, 3))  # [D, L, H_kv]
            values = g.ggml_cont(ctx, g.ggml_permute(ctx, vs, 1, 2, 0, 3))  # [L, D, H_kv]
            queries = g.ggml_cont(ctx, g.ggml_permute(ctx, qs, 0, 2, 1, 3))  # [D, n, H]
            scores = g.ggml_mul_mat(ctx, keys, queries)  # [L, n, H]; query head h reads kv head h // group
            weights = g.ggml_soft_max_ext(
                ctx, scores, self.input(self.mask(segment)), 1.0 / math.sqrt(dim), 0.0
            )
            out = g.ggml_mul_mat(ctx, values, weights)  # [D, n, H]
            out = g.ggml_reshape_2d(
                ctx, g.ggml_cont(ctx, g.ggml_permute(ctx, out, 0, 2, 1, 3)), dim * heads, n
            )
            outputs = out if outputs is None else g.ggml_concat(ctx, outputs, out, 1)
            offset += n
        return outputs, k, v

    def run(self) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
        g, ctx, config, stage = self.g, self.ctx, self.config, self.stage
        n_total = self.inputs.shape[0]
        if stage.is_first:
            x = g.ggml_get_rows(ctx, self.weight("embed_tokens.weight"), self.input(self.inputs))
        else:
            x = self.input(self.inputs)
        positions = self.input(
            np.concatenate([np.arange(s.start_pos, s.start_pos + s.n_tokens) for s in self.segments]).astype(
                np.int32
            )
        )
        factors = self.input(stage.freq_factors)
        new_kv = []
        start, end = stage.layer_range
        for layer in range(start, end):
            prefix = f"layers.{layer}"
            attended, k, v = self.attention(
                layer, layer - start, self.norm(x, f"{prefix}.input_layernorm.weight"), positions, factors
            )
            new_kv.append((k, v))
            x = g.ggml_add(ctx, x, self.linear(attended, f"{prefix}.self_attn.o_proj"))
            h = self.norm(x, f"{prefix}.post_attention_layernorm.weight")
            gate = g.ggml_silu(ctx, self.linear(h, f"{prefix}.mlp.gate_proj"))
            up = self.linear(h, f"{prefix}.mlp.up_proj")
            x = g.ggml_add(ctx, x, self.linear(g.ggml_mul(ctx, gate, up), f"{prefix}.mlp.down_proj"))
        if stage.is_last:
            last = np.cumsum([s.n_tokens for s in self.segments]).astype(np.int32) - 1
            x = g.ggml_get_rows(ctx, x, self.input(last))
            x = g.ggml_mul_mat(ctx, self.weight("lm_head.weight"), self.norm(x, "norm.weight"))
            rows, width = len(self.segments), config.vocab_size
        else:
            rows, width = n_total, config.hidden_size
        g.ggml_set_output(x)
        graph = g.ggml_new_graph_custom(ctx, self.n_nodes, False)
        g.ggml_build_forward_expand(graph, x)
        allocator = g.ggml_gallocr_new(g.ggml_backend_get_default_buffer_type(stage.backend))
        try:
            if not g.ggml_gallocr_alloc_graph(allocator, graph):
                raise StageError("ggml: could not allocate the step's graph")
            for tensor, array in self.feeds:
                g.ggml_backend_tensor_set(tensor, array.ctypes.data_as(ctypes.c_void_p), 0, array.nbytes)
            if g.ggml_backend_graph_compute(stage.backend, graph) != 0:
                raise StageError("ggml: the step's graph failed")
            result = self.read(x, (rows, width))
            shape = (n_total, config.num_key_value_heads, config.head_dim)
            kv = [(self.read(k, shape), self.read(v, shape)) for k, v in new_kv]
        finally:
            g.ggml_gallocr_free(allocator)
            g.ggml_free(ctx)
        return result, kv

    def read(self, tensor: Any, shape: tuple[int, ...]) -> np.ndarray:
        out = np.empty(shape, dtype=np.float32)
        self.g.ggml_backend_tensor_get(tensor, out.ctypes.data_as(ctypes.c_void_p), 0, out.nbytes)
        return out


def load_stage(
    checkpoint: Checkpoint | str,
    layer_range: tuple[int, int],
    *,
    dtype: str = "float32",
    device: str | None = None,
    progress: Progress | None = None,
    quantize: str | None = None,
    group_size: int = DEFAULT_GROUP_SIZE,
) -> GgmlStage:
    """Build layers `[start, end)` of `checkpoint` on ggml's CPU backend, reading only their tensors.

    `quantize` 'int8' / 'int4' hold the linear layers in ggml's q8_0 / q4_0 blocks of 32 weights, whatever
    `group_size` says (ggml's block size is fixed).
    """
    import torch

    from meshllm.engines.torch.stage import _group_by_layer
    from meshllm.engines.torch.weights import read_tensors, stage_tensor_names

    if device not in (None, "auto", "cpu"):
        raise ConfigError(f"device {device!r}: the ggml engine runs on the CPU here")
    bounds = stage_bounds(checkpoint, layer_range, dtype, DTYPES, quantize)
    checkpoint, config = bounds.checkpoint, bounds.checkpoint.config
    if config.quantization:
        raise ConfigError(
            f"{checkpoint.path}: a pre-quantized checkpoint cannot be loaded on the ggml engine"
        )
    names = stage_tensor_names(checkpoint, bounds.layer_range, bounds.is_first, bounds.is_last)
    groups = _group_by_layer(list(names))
    arrays: dict[str, np.ndarray] = {}
    for index, group in enumerate(groups):
        for name, tensor in read_tensors(checkpoint, group, torch.float32).items():
            arrays[names[name]] = tensor.numpy()
        if progress is not None:
            progress((index + 1) / len(groups))
    if bounds.is_last and config.tie_word_embeddings:
        embedding = arrays["embed_tokens.weight"] if bounds.is_first else arrays.pop("embed_tokens.weight")
        arrays["lm_head.weight"] = embedding
    if bounds.is_last and "lm_head.weight" not in arrays:
        raise ConfigError(f"{checkpoint.path}: tensor 'lm_head.weight' missing from the checkpoint")
    stage = GgmlStage(config, bounds.layer_range, bounds.is_first, bounds.is_last, arrays, dtype, quantize)
    held = f"{dtype}, linear layers {quantize}" if quantize else dtype
    log.info(
        "loaded layers %s of %s on ggml: %.1f MB (%s, %d threads; tensors per buffer type %s)",
        stage.layer_range,
        checkpoint.name,
        stage.weight_bytes() / 1e6,
        held,
        stage.threads,
        stage.weights.placement,
    )
    return stage


def calibrate(precision: Precision, device: str | None = None) -> Calibration:
    """Read speed from one-token mat-vecs and compute rate from 32-token mat-muls in ggml, at `precision`
    (eight 2048×2048 matrices; the median of the last five of six passes), as the other engines measure."""
    import time

    if device not in (None, "auto", "cpu"):
        raise ConfigError(f"device {device!r}: the ggml engine runs on the CPU here")
    size, count, batch = 2048, 8, 32
    rng = np.random.default_rng(0)
    arrays = {f"m{i}": rng.standard_normal((size, size), dtype=np.float32) for i in range(count)}
    g = ggml_module()
    stage = GgmlStage.__new__(GgmlStage)  # only the weight upload of a stage: no model around it
    stage.g, stage._buffers = g, []
    stage.backend = g.ggml_backend_cpu_init()
    threads = int(os.environ.get("OMP_NUM_THREADS") or 0) or os.cpu_count() or 1
    g.ggml_backend_cpu_set_n_threads(stage.backend, threads)
    try:
        weights = stage._upload(arrays, weight_type(g, precision.dtype, precision.quantize))

        def seconds(tokens: int) -> float:
            n_nodes = 4 * count + 8
            ctx = g.ggml_init(
                g.ggml_init_params(
                    mem_size=g.ggml_tensor_overhead() * n_nodes
                    + g.ggml_graph_overhead_custom(n_nodes, False),
                    mem_buffer=None,
                    no_alloc=True,
                )
            )
            allocator = g.ggml_gallocr_new(g.ggml_backend_get_default_buffer_type(stage.backend))
            try:
                x = g.ggml_new_tensor_2d(ctx, g.GGML_TYPE_F32, size, tokens)
                g.ggml_set_input(x)
                graph = g.ggml_new_graph_custom(ctx, n_nodes, False)
                for i in range(count):
                    out = g.ggml_mul_mat(ctx, weights.tensors[f"m{i}"], x)
                    g.ggml_set_output(out)
                    g.ggml_build_forward_expand(graph, out)
                if not g.ggml_gallocr_alloc_graph(allocator, graph):
                    raise StageError("ggml: could not allocate the calibration graph")
                vector = rng.standard_normal((tokens, size), dtype=np.float32)
                g.ggml_backend_tensor_set(x, vector.ctypes.data_as(ctypes.c_void_p), 0, vector.nbytes)
                passes = []
                for _ in range(6):
                    started = time.perf_counter()
                    g.ggml_backend_graph_compute(stage.backend, graph)
                    passes.append(time.perf_counter() - started)
                return sorted(passes[1:])[2]
            finally:
                g.ggml_gallocr_free(allocator)
                g.ggml_free(ctx)

        one, many = seconds(1), seconds(batch)
    finally:
        stage.close()
    arithmetic = max(many - one, many * 0.1)
    return Calibration(weights.nbytes / one, 2 * (batch - 1) * size * size * count / arithmetic)
