"""q/k/v and gate/up held as one matrix each in a ggml stage, and kept apart where they cannot be."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("ggml")

from meshllm.engines import load_stage  # noqa: E402
from meshllm.engines.ggml.fused import fuse_projections  # noqa: E402
from meshllm.models.gguf import GgufTensor  # noqa: E402
from tests.engines.stage_helpers import greedy_decode, make_prompt  # noqa: E402


def gguf_tensor(name: str, type_name: str, rows: int, row_bytes: int) -> GgufTensor:
    data = np.arange(rows * row_bytes, dtype=np.uint8)
    return GgufTensor(name, {"Q8_0": 8, "Q6_K": 14}[type_name], type_name, (rows, 32), data.size, data)


def test_a_stage_holds_qkv_and_gate_up_as_one_matrix_each(tiny_checkpoint):
    stage = load_stage("ggml", tiny_checkpoint("qwen2"), (0, 2))
    names = set(stage.weights.tensors)
    for layer in (0, 1):
        prefix = f"layers.{layer}"
        assert {f"{prefix}.self_attn.qkv_proj.weight", f"{prefix}.self_attn.qkv_proj.bias"} <= names
        assert f"{prefix}.mlp.gate_up_proj.weight" in names
        apart = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
        assert not any(f"{prefix}.{part}." in name for part in apart for name in names)


def test_stacked_rows_are_the_parts_rows_in_order():
    arrays: dict = {
        "layers.3.self_attn.q_proj.weight": np.full((4, 2), 1.0),
        "layers.3.self_attn.k_proj.weight": np.full((2, 2), 2.0),
        "layers.3.self_attn.v_proj.weight": np.full((2, 2), 3.0),
        "layers.3.mlp.gate_proj.weight": np.full((3, 2), 4.0),
        "layers.3.mlp.up_proj.weight": np.full((3, 2), 5.0),
    }
    fuse_projections(arrays, range(3, 4))
    assert sorted(arrays) == ["layers.3.mlp.gate_up_proj.weight", "layers.3.self_attn.qkv_proj.weight"]
    assert arrays["layers.3.self_attn.qkv_proj.weight"][:, 0].tolist() == [1, 1, 1, 1, 2, 2, 3, 3]
    assert arrays["layers.3.mlp.gate_up_proj.weight"][:, 0].tolist() == [4, 4, 4, 5, 5, 5]


def test_gguf_matrices_stack_as_bytes_when_they_share_a_type_and_stay_apart_when_not():
    same = {
        f"layers.0.self_attn.{p}.weight": gguf_tensor(f"blk.0.attn_{p[0]}.weight", "Q8_0", rows, 34)
        for p, rows in (("q_proj", 4), ("k_proj", 2), ("v_proj", 2))
    }
    parts = [same[name].data for name in same]
    fuse_projections(same, range(1))
    fused = same["layers.0.self_attn.qkv_proj.weight"]
    assert isinstance(fused, GgufTensor) and fused.shape == (8, 32) and fused.nbytes == 8 * 34
    assert np.array_equal(fused.data, np.concatenate(parts))
    mixed = {
        "layers.0.self_attn.q_proj.weight": gguf_tensor("blk.0.attn_q.weight", "Q8_0", 4, 34),
        "layers.0.self_attn.k_proj.weight": gguf_tensor("blk.0.attn_k.weight", "Q8_0", 2, 34),
        "layers.0.self_attn.v_proj.weight": gguf_tensor("blk.0.attn_v.weight", "Q6_K", 2, 210),
        "layers.0.self_attn.q_proj.bias": np.zeros(4),
        "layers.0.self_attn.k_proj.bias": np.zeros(2),
        "layers.0.self_attn.v_proj.bias": np.zeros(2),
    }
    fuse_projections(mixed, range(1))
    assert "layers.0.self_attn.qkv_proj.weight" not in mixed
    assert "layers.0.self_attn.qkv_proj.bias" not in mixed  # a bias follows its weight
    assert len(mixed) == 6


def test_a_stage_with_layers_kept_apart_computes_the_same(tiny_checkpoint, monkeypatch):
    """The graph's unfused path (a GGUF mixture's layers) gives the fused path's tokens."""
    path = tiny_checkpoint("llama")
    fused = load_stage("ggml", path, (0, 4))
    prompt = make_prompt(fused.config.vocab_size, 7)
    tokens, logits = greedy_decode([fused], prompt, 6)
    import meshllm.engines.ggml.stage as ggml_stage

    monkeypatch.setattr(ggml_stage, "fuse_projections", lambda arrays, layers: None)
    apart = load_stage("ggml", path, (0, 4))
    assert "layers.0.self_attn.q_proj.weight" in apart.weights.tensors
    apart_tokens, apart_logits = greedy_decode([apart], prompt, 6)
    assert apart_tokens == tokens
    np.testing.assert_allclose(apart_logits, logits, atol=1e-4, rtol=0)
