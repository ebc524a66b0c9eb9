"""A step of a ggml stage as one ggml graph, built for a shape of step and kept to run again.

The graph of a step depends only on its shape: each segment's sequence cache, token count and attention
span (its end position rounded up to whole cache chunks). Everything that moves from one decode step to
the next is a graph input: the tokens (or hidden states), their positions, the cache rows they write and
each segment's mask over its span. So a decode step reuses the previous step's graph, already allocated,
and only sets its inputs and computes it: no Python graph building, no allocation, per token.

ggml tensors list their dimensions fastest first: a `[T, hidden]` numpy array is a `[hidden, T]` ggml
tensor over the same memory, and a checkpoint's `[out, in]` weight is a `[in, out]` ggml matrix.
"""

from __future__ import annotations

import ctypes
import math
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import numpy as np

from meshllm.engines.ggml.cache import SequenceCache, padded
from meshllm.errors import StageError
from meshllm.step import Segment

if TYPE_CHECKING:
    from meshllm.engines.ggml.stage import GgmlStage

MASK_ROWS = 32  # GGML_KQ_MASK_PAD: flash attention's mask has its query rows padded to a multiple of it
KEPT_GRAPHS = 4  # graphs of recent step shapes kept allocated (pipelined micro-batches alternate)
KEPT_TOKENS = 64  # steps of more tokens (prefills) get a graph for that step only

GraphKey = tuple[tuple[int, int, int, int], ...]  # per segment: seq_id, cache generation, tokens, span


def graph_key(segments: list[Segment], caches: list[SequenceCache]) -> GraphKey:
    return tuple(
        (s.seq_id, cache.generation, s.n_tokens, padded(s.start_pos + s.n_tokens))
        for s, cache in zip(segments, caches, strict=True)
    )


def attention_mask(segment: Segment, span: int, window: int | None) -> np.ndarray:
    """`[rows, span]` float16 additive mask: query i (at start_pos + i) sees keys up to itself (and within
    the window); the span's rows past the segment's last token, stale or empty, are hidden."""
    n, start = segment.n_tokens, segment.start_pos
    rows = -(-n // MASK_ROWS) * MASK_ROWS
    query = np.arange(start, start + rows)[:, None]
    key = np.arange(span)[None, :]
    seen = key <= query
    if window is not None:
        seen &= key > query - window
    mask = np.where(seen, 0.0, -np.inf).astype(np.float16)
    mask[n:] = 0.0  # padding rows: no query reads them
    return mask


class StepGraph:
    """The graph of one shape of step, allocated in its own compute buffer; `run` computes one step."""

    def __init__(self, stage: GgmlStage, segments: list[Segment], caches: list[SequenceCache]):
        self.stage, self.g, self.config = stage, stage.g, stage.config
        g = self.g
        self.n_total = sum(s.n_tokens for s in segments)
        self.spans = [padded(s.start_pos + s.n_tokens) for s in segments]
        n_nodes = 256 + stage.layer_range.size * (64 + 32 * len(segments))
        self.ctx = g.ggml_init(
            g.ggml_init_params(
                mem_size=g.ggml_tensor_overhead() * n_nodes + g.ggml_graph_overhead_custom(n_nodes, False),
                mem_buffer=None,
                no_alloc=True,
            )
        )
        self.allocator: Any = None
        try:
            self._build(segments, caches, n_nodes)
        except BaseException:
            self.free()
            raise

    def new_input(self, kind: int, *ne: int) -> Any:
        g = self.g
        if len(ne) == 1:
            tensor = g.ggml_new_tensor_1d(self.ctx, kind, ne[0])
        else:
            tensor = g.ggml_new_tensor_2d(self.ctx, kind, ne[0], ne[1])
        g.ggml_set_input(tensor)
        return tensor

    def linear(self, x: Any, prefix: str) -> Any:
        g, tensors = self.g, self.stage.weights.tensors
        y = g.ggml_mul_mat(self.ctx, tensors[f"{prefix}.weight"], x)
        bias = tensors.get(f"{prefix}.bias")
        return y if bias is None else g.ggml_add(self.ctx, y, bias)

    def norm(self, x: Any, name: str) -> Any:
        g = self.g
        weight = self.stage.weights.tensors[name]
        return g.ggml_mul(self.ctx, g.ggml_rms_norm(self.ctx, x, self.config.rms_norm_eps), weight)

    def _build(self, segments: list[Segment], caches: list[SequenceCache], n_nodes: int) -> None:
        g, ctx, config, stage = self.g, self.ctx, self.config, self.stage
        n_total = self.n_total
        if stage.is_first:
            self.tokens = self.new_input(g.GGML_TYPE_I32, n_total)
            x = g.ggml_get_rows(ctx, stage.weights.tensors["embed_tokens.weight"], self.tokens)
        else:
            self.tokens = self.new_input(g.GGML_TYPE_F32, config.hidden_size, n_total)
            x = self.tokens
        self.positions = self.new_input(g.GGML_TYPE_I32, n_total)
        self.factors = self.new_input(g.GGML_TYPE_F32, len(stage.freq_factors))
        # per segment: the cache rows its tokens write, and its mask over its attention span
        self.rows = [self.new_input(g.GGML_TYPE_I64, s.n_tokens) for s in segments]
        self.masks = [
            self.new_input(g.GGML_TYPE_F16, span, -(-s.n_tokens // MASK_ROWS) * MASK_ROWS)
            for s, span in zip(segments, self.spans, strict=True)
        ]
        self.graph = g.ggml_new_graph_custom(ctx, n_nodes, False)
        start, end = stage.layer_range
        for layer in range(start, end):
            prefix = f"layers.{layer}"
            h = self.norm(x, f"{prefix}.input_layernorm.weight")
            attended = self.attention(layer, layer - start, h, segments, caches)
            x = g.ggml_add(ctx, x, self.linear(attended, f"{prefix}.self_attn.o_proj"))
            h = self.norm(x, f"{prefix}.post_attention_layernorm.weight")
            if f"{prefix}.mlp.gate_up_proj.weight" in stage.weights.tensors:  # [2 * I, T]: gate, then up
                activated = g.ggml_swiglu(ctx, self.linear(h, f"{prefix}.mlp.gate_up_proj"))
            else:
                gate = self.linear(h, f"{prefix}.mlp.gate_proj")
                activated = g.ggml_swiglu_split(ctx, gate, self.linear(h, f"{prefix}.mlp.up_proj"))
            x = g.ggml_add(ctx, x, self.linear(activated, f"{prefix}.mlp.down_proj"))
        if stage.is_last:
            self.last = self.new_input(g.GGML_TYPE_I32, len(segments))  # each segment's last token's row
            x = g.ggml_get_rows(ctx, x, self.last)
            x = g.ggml_mul_mat(ctx, stage.weights.tensors["lm_head.weight"], self.norm(x, "norm.weight"))
            self.out_shape = (len(segments), config.vocab_size)
        else:
            self.out_shape = (n_total, config.hidden_size)
        g.ggml_set_output(x)
        g.ggml_build_forward_expand(self.graph, x)
        self.output = x
        self.allocator = g.ggml_gallocr_new(g.ggml_backend_get_default_buffer_type(stage.backend))
        if not g.ggml_gallocr_alloc_graph(self.allocator, self.graph):
            raise StageError("ggml: could not allocate the step's graph")

    def attention(
        self, layer: int, local: int, x: Any, segments: list[Segment], caches: list[SequenceCache]
    ) -> Any:
        """The attention block's output `[H * D, T]`; the step's keys and values go into the caches."""
        g, ctx, config = self.g, self.ctx, self.config
        heads, kv_heads, dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        n_total = self.n_total
        prefix = f"layers.{layer}.self_attn"
        if f"{prefix}.qkv_proj.weight" in self.stage.weights.tensors:
            qkv = self.linear(x, f"{prefix}.qkv_proj")  # [(H + 2 * H_kv) * D, T]: q, k, v rows
            row, element = qkv.contents.nb[1], qkv.contents.nb[0]
            q = g.ggml_view_3d(ctx, qkv, dim, heads, n_total, dim * element, row, 0)
            k = g.ggml_view_3d(ctx, qkv, dim, kv_heads, n_total, dim * element, row, heads * dim * element)
            v = g.ggml_view_2d(ctx, qkv, kv_heads * dim, n_total, row, (heads + kv_heads) * dim * element)
        else:
            q = g.ggml_reshape_3d(ctx, self.linear(x, f"{prefix}.q_proj"), dim, heads, n_total)
            k = g.ggml_reshape_3d(ctx, self.linear(x, f"{prefix}.k_proj"), dim, kv_heads, n_total)
            v = self.linear(x, f"{prefix}.v_proj")  # [H_kv * D, T]
        if config.qk_norm:
            q, k = self.norm(q, f"{prefix}.q_norm.weight"), self.norm(k, f"{prefix}.k_norm.weight")
        rope = (dim, self.stage.rope_mode, 0, config.rope_theta, 1.0, 0.0, 1.0, 0.0, 0.0)
        q = g.ggml_rope_ext(ctx, q, self.positions, self.factors, *rope)
        k = g.ggml_rope_ext(ctx, k, self.positions, self.factors, *rope)
        k = g.ggml_reshape_2d(ctx, k, dim * kv_heads, n_total)  # [H_kv * D, T]
        if not g.ggml_is_contiguous(v):
            v = g.ggml_cont(ctx, v)
        outputs = []
        offset = 0
        for index, (segment, cache) in enumerate(zip(segments, caches, strict=True)):
            n, span = segment.n_tokens, self.spans[index]
            qs = g.ggml_view_3d(
                ctx, q, dim, heads, n, q.contents.nb[1], q.contents.nb[2], offset * q.contents.nb[2]
            )
            ks = g.ggml_view_2d(ctx, k, dim * kv_heads, n, k.contents.nb[1], offset * k.contents.nb[1])
            vs = g.ggml_view_2d(ctx, v, dim * kv_heads, n, v.contents.nb[1], offset * v.contents.nb[1])
            # the cache tensors with this step's rows written: the attention below reads them after
            cached_keys = g.ggml_set_rows(ctx, cache.keys[local], ks, self.rows[index])
            cached_values = g.ggml_set_rows(ctx, cache.values[local], vs, self.rows[index])
            keys = self.span_view(cached_keys, span)  # [D, span, H_kv]
            values = self.span_view(cached_values, span)
            queries = g.ggml_permute(ctx, qs, 0, 2, 1, 3)  # [D, n, H]
            out = g.ggml_flash_attn_ext(
                ctx, queries, keys, values, self.masks[index], 1.0 / math.sqrt(dim), 0.0, 0.0
            )  # [D, H, n]; query head h reads kv head h // (H / H_kv)
            g.ggml_flash_attn_ext_set_prec(out, g.GGML_PREC_F32)
            outputs.append(g.ggml_reshape_2d(ctx, out, dim * heads, n))
            offset += n
        while len(outputs) > 1:  # the segments' outputs side by side, pairwise (no quadratic copying)
            paired = [g.ggml_concat(ctx, a, b, 1) for a, b in zip(outputs[::2], outputs[1::2], strict=False)]
            outputs = paired + ([outputs[-1]] if len(outputs) % 2 else [])
        return outputs[0]

    def span_view(self, cached: Any, span: int) -> Any:
        """The first `span` positions of a `[H_kv * D, capacity]` cache as `[D, span, H_kv]`."""
        g, config = self.g, self.config
        row = cached.contents.nb[1]
        element = row // (config.num_key_value_heads * config.head_dim)
        view = g.ggml_view_3d(
            self.ctx,
            cached,
            config.head_dim,
            config.num_key_value_heads,
            span,
            config.head_dim * element,
            row,
            0,
        )
        return g.ggml_permute(self.ctx, view, 0, 2, 1, 3)

    def run(self, segments: list[Segment], inputs: np.ndarray) -> np.ndarray:
        """One step of this graph's shape: its inputs set, the graph computed, the output read."""
        g, stage = self.g, self.stage
        feeds: list[tuple[Any, np.ndarray]] = [(self.tokens, inputs), (self.factors, stage.freq_factors)]
        positions = np.concatenate([np.arange(s.start_pos, s.start_pos + s.n_tokens) for s in segments])
        feeds.append((self.positions, positions.astype(np.int32)))
        window = self.config.sliding_window
        for index, segment in enumerate(segments):
            rows = np.arange(segment.start_pos, segment.start_pos + segment.n_tokens, dtype=np.int64)
            feeds.append((self.rows[index], rows))
            feeds.append((self.masks[index], attention_mask(segment, self.spans[index], window)))
        if stage.is_last:
            feeds.append((self.last, np.cumsum([s.n_tokens for s in segments]).astype(np.int32) - 1))
        for tensor, array in feeds:
            array = np.ascontiguousarray(array)
            g.ggml_backend_tensor_set(tensor, array.ctypes.data_as(ctypes.c_void_p), 0, array.nbytes)
        started = time.perf_counter()
        failed = g.ggml_backend_graph_compute(stage.backend, self.graph) != 0
        stage.graphs.compute_seconds += time.perf_counter() - started
        if failed:
            raise StageError("ggml: the step's graph failed")
        out = np.empty(self.out_shape, dtype=np.float32)
        g.ggml_backend_tensor_get(self.output, out.ctypes.data_as(ctypes.c_void_p), 0, out.nbytes)
        return out

    def free(self) -> None:
        if self.allocator is not None:
            self.g.ggml_gallocr_free(self.allocator)
            self.allocator = None
        if self.ctx is not None:
            self.g.ggml_free(self.ctx)
            self.ctx = None


class GraphPool:
    """The graphs of the last few step shapes, least recently used first out; larger steps run on a graph
    of their own, freed after them."""

    def __init__(self) -> None:
        self.graphs: OrderedDict[GraphKey, StepGraph] = OrderedDict()
        self.built = 0  # graphs built so far (a decode that reuses its graph does not add to it)
        self.compute_seconds = 0.0  # spent inside ggml's graph compute, all steps together

    def run(
        self, stage: GgmlStage, segments: list[Segment], caches: list[SequenceCache], inputs: np.ndarray
    ) -> np.ndarray:
        key = graph_key(segments, caches)
        graph = self.graphs.get(key)
        if graph is not None:
            self.graphs.move_to_end(key)
            return graph.run(segments, inputs)
        graph = StepGraph(stage, segments, caches)
        self.built += 1
        if graph.n_total > KEPT_TOKENS:
            try:
                return graph.run(segments, inputs)
            finally:
                graph.free()
        self.graphs[key] = graph
        while len(self.graphs) > KEPT_GRAPHS:
            self.graphs.popitem(last=False)[1].free()
        return graph.run(segments, inputs)

    def forget(self, seq_ids: set[int]) -> None:
        """Free the graphs that read or write these sequences' caches."""
        for key in [key for key in self.graphs if any(part[0] in seq_ids for part in key)]:
            self.graphs.pop(key).free()

    def clear(self) -> None:
        for graph in self.graphs.values():
            graph.free()
        self.graphs.clear()
