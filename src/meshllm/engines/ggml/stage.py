"""A ggml pipeline stage: layers `[start, end)` of a Llama-family checkpoint as a ggml graph on the CPU.

ggml (the tensor library under llama.cpp) is driven through its Python bindings, `ggml-python`. The
stage holds its weights in ggml backend buffers, in float32, float16 or bfloat16, or quantized at
load to ggml's block formats (`quantize="int8"` → q8_0: blocks of 32 weights with one scale each;
`"int4"` → q4_K: super-blocks of 256, or q4_0 for rows that are not whole 256s), or as a GGUF file stores
them. A step is one graph: every linear layer runs once over the `T` tokens of the step; attention runs
per segment, against that sequence's cache. The variants are fields of `ModelConfig`, as in the torch
engine: q/k/v bias (qwen2), per-head q/k RMSNorm (qwen3), tied embeddings, RoPE scaling (as ggml's
per-frequency factors), a sliding window (mistral).

ggml tensors list their dimensions fastest first: a `[T, hidden]` numpy array is a `[hidden, T]` ggml
tensor over the same memory, and a checkpoint's `[out, in]` weight is a `[in, out]` ggml matrix.

Each sequence's KV cache lives in a ggml backend buffer (`cache.py`), float32 for a float32 stage and
float16 otherwise (as llama.cpp holds it); the step graphs (`graph.py`) write and read it themselves, and
are kept between steps of the same shape, so a decode step only sets its inputs and computes.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

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
from meshllm.engines.ggml.cache import SequenceCache
from meshllm.engines.ggml.fused import fuse_projections
from meshllm.engines.ggml.graph import GraphPool
from meshllm.errors import ConfigError, StageError
from meshllm.models.checkpoint import Checkpoint
from meshllm.models.config import ModelConfig
from meshllm.models.gguf import GgufTensor, rope_freq_divisors
from meshllm.models.rope import inverse_frequencies
from meshllm.step import LayerRange, StepInput, StepOutput

log = logging.getLogger(__name__)

DTYPES = ("float32", "float16", "bfloat16")
GGUF_FLOATS = ("F32", "F16", "BF16")
QUANT_BLOCK = 32  # weights per q8_0 / q4_0 block: the row length must be a multiple of it
LOG_WARN = 3  # GGML_LOG_LEVEL_WARN
ROPE_NORMAL, ROPE_NEOX = 0, 2  # GGML_ROPE_TYPE_*: rotate adjacent pairs, or the two halves of a head


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
        if not ggml.ggml_cpu_has_llamafile():
            log.warning(
                "ggml-python was built without GGML_LLAMAFILE: prompts run 2-3x slower on the ggml engine; "
                "rebuild it with CMAKE_ARGS=-DGGML_LLAMAFILE=ON pip install --force-reinstall --no-deps "
                "--no-cache-dir ggml-python (make setup does)"
            )
    return ggml


def weight_type(g: Any, dtype: str, quantize: str | None) -> int:
    if quantize == "int8":
        return int(g.GGML_TYPE_Q8_0)
    if quantize == "int4":
        # q4_K (super-blocks of 256: 4-bit weights, 6-bit scales and minima per 32) where a row allows it,
        # q4_0 for shorter rows (`held_type`): on x86 ggml's q4_K mat-vec runs ~1.6x faster than q4_0's
        return int(g.GGML_TYPE_Q4_K)
    return int({"float32": g.GGML_TYPE_F32, "float16": g.GGML_TYPE_F16, "bfloat16": g.GGML_TYPE_BF16}[dtype])


def held_type(g: Any, matrix_type: int, columns: int) -> int:
    """The type a matrix of rows of `columns` weights is held in for `matrix_type`: q4_K's super-blocks
    need rows of whole 256s, else q4_0 (blocks of 32)."""
    if matrix_type == g.GGML_TYPE_Q4_K and columns % g.ggml_blck_size(matrix_type):
        return int(g.GGML_TYPE_Q4_0)
    return matrix_type


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
        arrays: dict[str, np.ndarray | GgufTensor],  # stage parameter name -> float32 array, or as stored
        dtype: str,
        quantize: str | None,
        threads: int | None = None,
        interleaved_rope: bool = False,  # a GGUF Llama's q/k rows: RoPE over adjacent pairs
        freq_factors: np.ndarray | None = None,  # per-frequency divisors (a GGUF's rope_freqs)
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
        self.freq_factors = rope_freq_factors(config) if freq_factors is None else freq_factors
        self.rope_mode = ROPE_NORMAL if interleaved_rope else ROPE_NEOX
        arrays = dict(arrays)
        fuse_projections(arrays, range(*layer_range))
        self.weights = self._upload(arrays, weight_type(g, dtype, quantize))
        self._caches: dict[int, SequenceCache] = {}
        # float32 caches for a float32 stage (equality with the reference); float16, as llama.cpp's, else
        self.kv_type = int(g.GGML_TYPE_F32 if dtype == "float32" and quantize is None else g.GGML_TYPE_F16)
        self.graphs = GraphPool()

    @property
    def device_type(self) -> str:
        return "cpu"

    def live_sequences(self) -> int:
        return len(self._caches)

    def weight_bytes(self) -> int:
        return self.weights.nbytes

    def kv_bytes_per_token(self) -> int:
        return self.config.kv_bytes_per_token(
            self.layer_range.size, 4 if self.kv_type == self.g.GGML_TYPE_F32 else 2
        )

    def set_kv_memory(self, nbytes: int) -> None:
        """Each sequence's cache grows with it (`cache.CHUNK` positions at a time): nothing to bound."""

    def set_threads(self, threads: int) -> None:
        self.threads = threads
        self.g.ggml_backend_cpu_set_n_threads(self.backend, threads)

    def release(self, seq_ids: list[int]) -> None:
        self.graphs.forget(set(seq_ids))
        for seq_id in seq_ids:
            cache = self._caches.pop(seq_id, None)
            if cache is not None:
                cache.free()

    def close(self) -> None:
        g = self.g
        if getattr(self, "graphs", None) is not None:
            self.graphs.clear()
        for cache in getattr(self, "_caches", {}).values():
            cache.free()
        self._caches = {}
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

    def _upload(self, arrays: Mapping[str, np.ndarray | GgufTensor], matrix_type: int) -> Weights:
        """Every parameter into backend buffers: float32 matrices in `matrix_type`, vectors in float32, a
        GGUF's tensors as stored (its float matrices in `matrix_type` when that is a block format). Block
        matrices go, as in llama.cpp, into the first extra buffer type that takes their mat-mul (the AMX
        or repacked layouts), except the embedding table, which is looked up (get_rows), not multiplied."""
        g = self.g
        plain = g.ggml_backend_get_default_buffer_type(self.backend)
        # not AMX's: its mat-mul over several tokens stops the process (a segfault, or SIGILL as llama.cpp's
        # own does) on the machines measured, at the tests' shapes and at Qwen3-0.6B's alike
        extra = [b for b in self.extra_buffer_types() if g.ggml_backend_buft_name(b) != b"AMX"]
        placed: dict[int, tuple[Any, list[tuple[str, np.ndarray | GgufTensor, int]]]] = {}
        for name, array in arrays.items():
            if isinstance(array, GgufTensor) and (
                len(array.shape) == 1
                or array.type_name not in GGUF_FLOATS
                or g.ggml_blck_size(matrix_type) == 1
            ):
                kind = array.ggml_type  # as stored
            else:
                if isinstance(array, GgufTensor):
                    array = array.float32()  # a float matrix of a GGUF, quantized at load as asked
                array = np.ascontiguousarray(array, dtype=np.float32)
                kind = held_type(g, matrix_type, array.shape[1]) if array.ndim == 2 else int(g.GGML_TYPE_F32)
                if g.ggml_blck_size(kind) > 1 and array.shape[1] % QUANT_BLOCK:
                    raise ConfigError(
                        f"{name}: rows of {array.shape[1]} weights cannot be held in ggml blocks of {QUANT_BLOCK}"
                    )
            buft = plain
            if len(array.shape) == 2 and g.ggml_blck_size(kind) > 1 and name != "embed_tokens.weight":
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
                if len(array.shape) == 2:
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
                if isinstance(array, GgufTensor):
                    data = np.ascontiguousarray(array.data)  # read from the file here, and only here
                elif kind == g.GGML_TYPE_F32:
                    data = array
                else:
                    data = self._encode(array, kind)
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

    def _cache(self, seq_id: int, start_pos: int, n_tokens: int) -> SequenceCache:
        """The sequence's cache, with room for the segment; a step may restart from an earlier position."""
        cache = self._caches.get(seq_id)
        if cache is None:
            if start_pos != 0:
                raise StageError(f"sequence {seq_id}: first step starts at position {start_pos}, not 0")
            row = self.config.num_key_value_heads * self.config.head_dim
            cache = SequenceCache(self.g, self.backend, self.layer_range.size, row, self.kv_type)
            self._caches[seq_id] = cache
        if start_pos > cache.offset:
            raise StageError(
                f"sequence {seq_id}: step at position {start_pos} but the cache holds {cache.offset}"
            )
        generation = cache.generation
        cache.offset = min(cache.offset, start_pos)  # a restart: what follows start_pos is stale
        cache.reserve(start_pos + n_tokens)
        if cache.generation != generation:  # a new buffer: the graphs over the old one are of no use
            self.graphs.forget({seq_id})
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
        if len({s.seq_id for s in segments}) != len(segments):
            raise StageError(f"step {step.step_id}: a sequence in more than one segment")
        caches = [self._cache(s.seq_id, s.start_pos, s.n_tokens) for s in segments]
        result = self.graphs.run(self, segments, caches, inputs)
        for segment, cache in zip(segments, caches, strict=True):
            cache.offset = segment.start_pos + segment.n_tokens
        if not self.is_last:
            return StepOutput(step.step_id, segments, hidden_states=result)
        return StepOutput(step.step_id, segments, logits=result)


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

    `quantize` 'int8' / 'int4' hold the linear layers in ggml's q8_0 / q4_K (q4_0 for short rows) blocks, whatever
    `group_size` says (ggml's block size is fixed).
    """
    import torch

    from meshllm.engines.torch.stage import _group_by_layer
    from meshllm.engines.torch.weights import read_tensors, stage_tensor_names

    if device not in (None, "auto", "cpu"):
        raise ConfigError(f"device {device!r}: the ggml engine runs on the CPU here")
    bounds = stage_bounds(checkpoint, layer_range, dtype, DTYPES, quantize, reads_gguf=True)
    checkpoint, config = bounds.checkpoint, bounds.checkpoint.config
    if config.quantization:
        raise ConfigError(
            f"{checkpoint.path}: a pre-quantized checkpoint cannot be loaded on the ggml engine"
        )
    names = stage_tensor_names(checkpoint, bounds.layer_range, bounds.is_first, bounds.is_last)
    arrays: dict[str, np.ndarray | GgufTensor] = {}
    extra: dict[str, Any] = {}
    if checkpoint.gguf is not None:  # the range's tensors as stored; their bytes are read at upload
        checkpoint.require(list(names))
        arrays = {stage_name: checkpoint.gguf.tensors[name] for name, stage_name in names.items()}
        extra = {
            "interleaved_rope": checkpoint.gguf.interleaved_rope,
            "freq_factors": rope_freq_divisors(checkpoint.gguf),
        }
    else:
        groups = _group_by_layer(list(names))
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
    stage = GgmlStage(
        config, bounds.layer_range, bounds.is_first, bounds.is_last, arrays, dtype, quantize, **extra
    )
    if progress is not None and checkpoint.gguf is not None:
        progress(1.0)
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


def calibrate(
    precision: Precision,
    device: str | None = None,
    threads: int | None = None,
    volume: int = 0,
    alone: int | None = None,
) -> Calibration:
    """Read speed from one-token mat-vecs over about `volume` bytes of 2048×2048 matrices (at least
    eight), compute rate from 32-token mat-muls over eight, and a decode step's from DECODE_BATCH-token
    mat-muls over the whole volume, in ggml at `precision` (the median of the last five of six passes),
    as the other engines measure; with `alone`, the read speed again with that many threads (the same
    upload, timed twice)."""
    import time

    if device not in (None, "auto", "cpu"):
        raise ConfigError(f"device {device!r}: the ggml engine runs on the CPU here")
    size, batch = 2048, 32
    rng = np.random.default_rng(0)
    g = ggml_module()
    matrix = rng.standard_normal((size, size), dtype=np.float32)
    matrix_bytes = g.ggml_row_size(weight_type(g, precision.dtype, precision.quantize), size) * size
    count = read_matrices(volume, matrix_bytes)
    arrays = {f"m{i}": matrix for i in range(count)}  # one array, uploaded into distinct memory
    stage = GgmlStage.__new__(GgmlStage)  # only the weight upload of a stage: no model around it
    stage.g, stage._buffers = g, []
    stage.backend = g.ggml_backend_cpu_init()
    threads = threads or int(os.environ.get("OMP_NUM_THREADS") or 0) or os.cpu_count() or 1
    g.ggml_backend_cpu_set_n_threads(stage.backend, threads)
    try:
        weights = stage._upload(arrays, weight_type(g, precision.dtype, precision.quantize))

        def seconds(tokens: int, count: int) -> float:
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

        read, decode = seconds(1, count), seconds(DECODE_BATCH, count)
        one, many = seconds(1, COMPUTE_MATRICES), seconds(batch, COMPUTE_MATRICES)
        read_alone = 0.0
        if alone is not None and alone != threads:
            g.ggml_backend_cpu_set_n_threads(stage.backend, alone)
            read_alone = seconds(1, count)
    finally:
        stage.close()
    return Calibration(
        weights.nbytes / read,
        added_rate(batch, size * size * COMPUTE_MATRICES, one, many),
        weights.nbytes / read_alone if read_alone else 0.0,
        added_rate(DECODE_BATCH, size * size * count, read, decode),
    )
