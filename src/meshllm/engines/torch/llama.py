"""The Llama family (Llama, Mistral, Qwen2, Qwen3) written for stage execution.

The variants differ only in fields of `ModelConfig`: q/k/v bias (qwen2), per-head q/k RMSNorm (qwen3),
tied embeddings, RoPE scaling (llama 3) and a sliding attention window (mistral). Parameter names match
the Hugging Face checkpoints below the `model.` prefix, with global layer indices.

Tensors inside a step are flat: `T` is the total number of new tokens of all the step's segments, and
attention is the only operation that looks at segments separately: each reads its own sequence's cache,
the decode tokens of neighbouring slots of a KV pool in one call (`kv.py`), the others one by one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from meshllm.engines.torch.kv import StepKV
from meshllm.errors import ConfigError
from meshllm.models.config import ModelConfig
from meshllm.models.rope import inverse_frequencies
from meshllm.step import Segment

LM_HEAD_CHUNK_ROWS = 32768  # vocabulary rows per lm_head matmul on a CPU


class Linear(nn.Module):
    """nn.Linear without random initialisation: every weight comes from the checkpoint."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class FusedLinear:
    """Several linear layers of one input computed as one matmul, their outputs split again.

    The parts keep their parameters, under their checkpoint names, as views into the fused weight: the
    memory is held once, and a stage's parameters still read like the checkpoint's tensors.
    """

    def __init__(self, parts: list[Linear]):
        self.sizes = [part.weight.shape[0] for part in parts]
        with torch.no_grad():
            self.weight = torch.cat([part.weight for part in parts])
            has_bias = [part.bias is not None for part in parts]
            self.bias = (
                torch.cat([part.bias for part in parts if part.bias is not None]) if all(has_bias) else None
            )
            if any(has_bias) and not all(has_bias):
                raise ConfigError("a fused projection needs a bias on every part or on none")
            offset = 0
            for part, size in zip(parts, self.sizes, strict=True):
                part.weight.data = self.weight[offset : offset + size]
                if part.bias is not None and self.bias is not None:
                    part.bias.data = self.bias[offset : offset + size]
                offset += size

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return F.linear(x, self.weight, self.bias).split(self.sizes, dim=-1)


class Embedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size))

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(token_ids, self.weight)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 whatever the model's dtype, as the reference implementation does.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Inverse frequencies of the rotary embedding, with the checkpoint's `rope_scaling` applied."""
    _, scaled = inverse_frequencies(config)
    return torch.from_numpy(scaled).float()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def attention_mask(start_pos: int, n: int, window: int | None, device: torch.device) -> torch.Tensor | None:
    """Boolean `[n, start_pos + n]` mask: query i (at start_pos + i) sees keys up to itself (and the window)."""
    if n == 1 and (window is None or start_pos < window):
        return None
    query_pos = torch.arange(start_pos, start_pos + n, device=device)[:, None]
    key_pos = torch.arange(start_pos + n, device=device)[None, :]
    mask = key_pos <= query_pos
    if window is not None:
        mask &= key_pos > query_pos - window
    return mask


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.window = config.sliding_window
        bias = config.attention_bias
        hidden = config.hidden_size
        self.q_proj = Linear(hidden, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = Linear(hidden, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = Linear(hidden, self.n_kv_heads * self.head_dim, bias=bias)
        # qwen2's bias is on q/k/v only; llama-style checkpoints with attention_bias have it on o_proj too
        self.o_proj = Linear(self.n_heads * self.head_dim, hidden, bias=bias and config.model_type != "qwen2")
        # qwen3 normalises each head's queries and keys before the rotary embedding.
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.qkv: FusedLinear | None = None  # q, k and v in one matmul, once the weights are in place

    def fuse(self) -> None:
        self.qkv = FusedLinear([self.q_proj, self.k_proj, self.v_proj])

    def forward(
        self,
        x: torch.Tensor,  # [T, hidden]
        cos: torch.Tensor,  # [T, D]
        sin: torch.Tensor,
        segments: list[Segment],
        kv: StepKV,
        layer: int,
    ) -> torch.Tensor:
        T = x.shape[0]
        if self.qkv is not None:
            q, k, v = self.qkv(x)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(T, self.n_heads, self.head_dim)
        k = k.view(T, self.n_kv_heads, self.head_dim)
        v = v.view(T, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:  # both or neither (qk_norm)
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = cos[:, None, :], sin[:, None, :]  # broadcast over heads
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin

        out = x.new_empty(T, self.n_heads * self.head_dim)
        for batch in kv.batches:  # decode tokens of sequences in neighbouring slots of a pool: one call
            pool_keys, pool_values = batch.pool.keys[layer], batch.pool.values[layer]
            pool_keys[batch.slots, :, batch.positions] = k[batch.rows]
            pool_values[batch.slots, :, batch.positions] = v[batch.rows]
            count, length = batch.mask.shape[0], batch.mask.shape[-1]
            run = slice(batch.first, batch.first + count)
            queries = q.new_zeros(count, self.n_heads, 1, self.head_dim)
            queries[batch.local, :, 0] = q[batch.rows]
            attended = F.scaled_dot_product_attention(
                queries,  # [count, H, 1, D]
                pool_keys[run, :, :length],  # [count, H_kv, length, D]
                pool_values[run, :, :length],
                attn_mask=batch.mask,
                enable_gqa=self.n_heads != self.n_kv_heads,
            )
            out[batch.rows] = attended[batch.local, :, 0].reshape(-1, self.n_heads * self.head_dim)
        offset = 0
        for index, (segment, cache) in enumerate(zip(segments, kv.caches, strict=True)):
            n = segment.n_tokens
            span = slice(offset, offset + n)
            offset += n
            if index in kv.batched:
                continue
            end = segment.start_pos + n
            cache.write(layer, k[span].transpose(0, 1), v[span].transpose(0, 1), segment.start_pos)
            keys, values = cache.view(layer, end)
            mask = attention_mask(segment.start_pos, n, self.window, x.device)
            if n == 1 and mask is None and self._small_matmuls_win(x):
                out[span] = self._one_query(q[span][0], keys, values)
            else:
                attended = F.scaled_dot_product_attention(
                    q[span].transpose(0, 1)[None],  # [1, H, n, D]
                    keys[None],  # [1, H_kv, L, D]
                    values[None],
                    attn_mask=mask,
                    enable_gqa=self.n_heads != self.n_kv_heads,
                )
                out[span] = attended[0].transpose(0, 1).reshape(n, self.n_heads * self.head_dim)
        return self.o_proj(out)

    @staticmethod
    def _small_matmuls_win(x: torch.Tensor) -> bool:
        """Whether one decode token's attention is quicker as two small matmuls than in the fused kernel:
        in float32 on a CPU (by a fifth at short contexts). In bfloat16 and float16 the CPU's small
        matmuls are slow, and the fused kernel is 4 to 8 times quicker (the kernel's own fixed cost
        is small next to that); on a GPU the fused kernel always wins."""
        return x.dtype == torch.float32 and x.device.type == "cpu"

    def _one_query(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Attention of one decode token: two small matmuls and a softmax."""
        group = self.n_heads // self.n_kv_heads
        queries = q.view(self.n_kv_heads, group, self.head_dim)  # [H_kv, G, D]
        scores = torch.matmul(queries, keys.transpose(1, 2)).float() * self.scale  # [H_kv, G, L]
        weights = torch.softmax(scores, dim=-1).to(values.dtype)
        return torch.matmul(weights, values).reshape(1, self.n_heads * self.head_dim)  # [1, H * D]


class FeedForward(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        bias = bool(config.raw.get("mlp_bias", False))
        self.gate_proj = Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.up_proj = Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=bias)
        self.gate_up: FusedLinear | None = None  # gate and up in one matmul, once the weights are in place

    def fuse(self) -> None:
        self.gate_up = FusedLinear([self.gate_proj, self.up_proj])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up is not None:
            gate, up = self.gate_up(x)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = FeedForward(config)

    def forward(self, x, cos, sin, segments, kv: StepKV, layer: int) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, segments, kv, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class StageModel(nn.Module):
    """Layers `[start, end)`; the embedding when first; the final norm and lm_head when last.

    Parameter names are the checkpoint's without the `model.` prefix: `layers.{i}.…` keeps the global i.
    """

    inv_freq: torch.Tensor  # a non-persistent buffer, registered in __init__

    def __init__(
        self,
        config: ModelConfig,
        layer_range: tuple[int, int],
        is_first: bool,
        is_last: bool,
        inv_freq: torch.Tensor | None = None,  # computed by the caller when building on the meta device
    ):
        super().__init__()
        start, end = layer_range
        self.config = config
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size) if is_first else None
        self.layers = nn.ModuleDict({str(i): DecoderLayer(config) for i in range(start, end)})
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps) if is_last else None
        # A Linear, or a quantized layer when the stage holds its weights quantized.
        self.lm_head: nn.Module | None = (
            Linear(config.hidden_size, config.vocab_size, bias=False) if is_last else None
        )
        inv_freq = rope_inv_freq(config) if inv_freq is None else inv_freq
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def fuse(self) -> None:
        """Fuse each layer's q/k/v and gate/up projections (after the weights are on their device)."""
        for layer in self.layers.values():
            assert isinstance(layer, DecoderLayer)
            layer.self_attn.fuse()
            layer.mlp.fuse()

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[:, None].float() * self.inv_freq[None, :]  # [T, D/2]
        angles = torch.cat((freqs, freqs), dim=-1)  # [T, D]
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def forward(
        self,
        hidden_states: torch.Tensor,  # [T, hidden], or [T] token ids on the first stage
        positions: torch.Tensor,  # [T]
        segments: list[Segment],
        kv: StepKV,  # the segments' caches
    ) -> torch.Tensor:
        if self.embed_tokens is not None:
            hidden_states = self.embed_tokens(hidden_states)
        cos, sin = self.rope(positions, hidden_states.dtype)
        for index, layer in self.layers.items():
            hidden_states = layer(hidden_states, cos, sin, segments, kv, int(index))
        return hidden_states

    def logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[S, hidden] -> [S, vocab], last stage only."""
        assert self.lm_head is not None and self.norm is not None, "logits() on a stage that is not last"
        hidden_states = self.norm(hidden_states)
        if not isinstance(self.lm_head, Linear | nn.Linear):  # held quantized: its own kernel
            return self.lm_head(hidden_states)
        weight = self.lm_head.weight
        if weight.device.type != "cpu" or weight.shape[0] < LM_HEAD_CHUNK_ROWS:
            return self.lm_head(hidden_states)
        # A tall matrix in row blocks: measured faster on CPUs than one GEMV over the whole vocabulary.
        return torch.cat(
            [F.linear(hidden_states, block) for block in weight.split(LM_HEAD_CHUNK_ROWS)], dim=-1
        )
