"""MLX-quantized checkpoints: packed as they are in the MLX engine, and held quantized by the torch engine
too (4 bits onto its int4 kernel as they are, 8 bits requantized to int8 per output channel).

The checkpoints are made by mlx-lm's own converter from tiny float32 checkpoints (hidden 64, intermediate
128: every input dimension divides the group sizes used).
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from meshllm.engines import load_stage
from meshllm.engines.torch.qlinear import QuantizedLinear
from meshllm.engines.torch.quantized import dequantize
from meshllm.errors import ConfigError

mx = pytest.importorskip("mlx.core")
nn = pytest.importorskip("mlx.nn")
pytest.importorskip("mlx_lm")

from mlx_lm.convert import convert  # noqa: E402

from tests.engines.stage_helpers import greedy_decode, make_prompt, mlx_lm_greedy  # noqa: E402

N_TOKENS = 16
# (arch, bits, group size): qwen3 ties its embeddings, so its lm_head is the quantized embedding matrix.
VARIANTS = [("qwen3", 8, 64), ("qwen3", 4, 32), ("llama", 4, 64), ("qwen2", 8, 32)]
VARIANT_IDS = [f"{arch}-q{bits}-g{group}" for arch, bits, group in VARIANTS]
MIXED = "llama-mixed"  # 4 bits in groups of 32, down_proj 8 bits in groups of 64: per-layer config entries


def mixed_precision(path: str, module: Any) -> bool | dict[str, Any]:
    return {"group_size": 64, "bits": 8, "mode": "affine"} if path.endswith("down_proj") else True


@pytest.fixture(scope="module")
def quantized(
    tiny_checkpoint: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """Variant id -> a checkpoint quantized by mlx-lm's converter."""
    folders = {}
    for variant_id, (arch, bits, group_size) in zip(VARIANT_IDS, VARIANTS, strict=True):
        folder = tmp_path_factory.mktemp("quantized") / variant_id
        with contextlib.redirect_stdout(io.StringIO()):  # the converter prints its progress
            convert(
                str(tiny_checkpoint(arch)), str(folder), quantize=True, q_bits=bits, q_group_size=group_size
            )
        folders[variant_id] = folder
    folders[MIXED] = tmp_path_factory.mktemp("quantized") / MIXED
    with contextlib.redirect_stdout(io.StringIO()):
        convert(
            str(tiny_checkpoint("llama")),
            str(folders[MIXED]),
            quantize=True,
            q_bits=4,
            q_group_size=32,
            quant_predicate=mixed_precision,
        )
    return folders


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_dequantize_equals_mx_dequantize(bits, group_size):
    weight = mx.random.normal((24, 256), key=mx.random.key(bits * group_size))
    packed, scales, biases = mx.quantize(weight, group_size=group_size, bits=bits)
    expected = np.array(mx.dequantize(packed, scales, biases, group_size=group_size, bits=bits))
    dense = dequantize(*(torch.from_numpy(np.array(a)) for a in (packed, scales, biases)), bits=bits)
    np.testing.assert_array_equal(dense.numpy(), expected)  # float32 scales: bit for bit


@pytest.mark.parametrize("bits", [4, 8])
def test_dequantize_with_bfloat16_scales_is_within_one_rounding_of_mx(bits):
    weight = mx.random.normal((24, 256), key=mx.random.key(bits)).astype(mx.bfloat16)
    packed, scales, biases = mx.quantize(weight, group_size=64, bits=bits)
    expected = np.array(mx.dequantize(packed, scales, biases, group_size=64, bits=bits).astype(mx.float32))
    # The engine reads scales and biases as float32 (exact for bfloat16 values).
    as_torch = [
        torch.from_numpy(np.array(a)) for a in (packed, scales.astype(mx.float32), biases.astype(mx.float32))
    ]
    dense = dequantize(*as_torch, bits=bits).to(torch.bfloat16).float().numpy()
    # mx rounds q * scale to bfloat16, then adds the bias and rounds again; here q * scale + bias is exact in
    # float32 and rounded once. Each rounding is within half a step (2**-8 relative) of its operand, and
    # |q * scale| <= |result| + |bias|, so the two differ by at most 2**-7 * (|result| + |bias|).
    bias = np.repeat(np.array(biases.astype(mx.float32)), 64, axis=1)
    assert (np.abs(dense - expected) <= 2.0**-7 * (np.abs(expected) + np.abs(bias))).all()
    assert (dense != expected).any()  # the comparison above is not vacuous


@pytest.mark.parametrize("variant", [*VARIANT_IDS, MIXED])
def test_mlx_stage_equals_mlx_lm_on_a_quantized_checkpoint(variant, quantized):
    stage = load_stage("mlx", quantized[variant], (0, 4))
    prompt = make_prompt(stage.config.vocab_size, 9, seed=1)
    tokens, logits = greedy_decode([stage], prompt, N_TOKENS)
    expected_tokens, expected_logits = mlx_lm_greedy(quantized[variant], prompt, N_TOKENS)
    np.testing.assert_allclose(logits, expected_logits, atol=1e-4, rtol=0)
    assert tokens == expected_tokens


@pytest.mark.parametrize(
    "variant", [v for v, (_, bits, _) in zip(VARIANT_IDS, VARIANTS, strict=True) if bits == 4]
)
def test_torch_stage_runs_4_bit_weights_packed_and_equals_the_mlx_stage(variant, quantized):
    mlx_stage = load_stage("mlx", quantized[variant], (0, 4))
    torch_stage = load_stage("torch", quantized[variant], (0, 4), device="cpu")
    prompt = make_prompt(mlx_stage.config.vocab_size, 9, seed=2)
    tokens, logits = greedy_decode([torch_stage], prompt, N_TOKENS)
    expected_tokens, expected_logits = greedy_decode([mlx_stage], prompt, N_TOKENS)
    # 4-bit groups map onto the int4 kernel without requantizing (zero = bias + 8 * scale, in float32
    # here), so the two engines compute the same function and differ only in summation order, exactly
    # as on a float32 checkpoint: the same 1e-4 bound holds.
    np.testing.assert_allclose(logits, expected_logits, atol=1e-4, rtol=0)
    assert tokens == expected_tokens


@pytest.mark.parametrize(
    "variant", [*(v for v, (_, bits, _) in zip(VARIANT_IDS, VARIANTS, strict=True) if bits == 8), MIXED]
)
def test_torch_stage_requantizes_8_bit_weights_and_keeps_the_mlx_stage_s_tokens(variant, quantized):
    mlx_stage = load_stage("mlx", quantized[variant], (0, 4))
    torch_stage = load_stage("torch", quantized[variant], (0, 4), device="cpu")
    prompt = make_prompt(mlx_stage.config.vocab_size, 9, seed=2)
    tokens, logits = greedy_decode([torch_stage], prompt, N_TOKENS)
    expected_tokens, expected_logits = greedy_decode([mlx_stage], prompt, N_TOKENS)
    # MLX's 8-bit groups (scale and bias per group) cannot be the int8 kernel's symmetric per-channel
    # weights, so they are requantized: logits keep a cosine similarity above 0.999 (observed 0.9998, max
    # abs difference ~0.5 on logits of magnitude ~40) and greedy decoding keeps its tokens.
    for actual, expected in zip(logits, expected_logits, strict=True):
        cosine = np.dot(actual, expected) / (np.linalg.norm(actual) * np.linalg.norm(expected))
        assert cosine > 0.999, cosine
    assert tokens == expected_tokens


def test_quantization_changes_the_output(quantized, tiny_checkpoint):
    """A guard on the tests above: the quantized model is not silently the float one."""
    prompt = make_prompt(512, 9, seed=3)
    quantized_logits = greedy_decode([load_stage("mlx", quantized["qwen3-q4-g32"], (0, 4))], prompt, 1)[1]
    float_logits = greedy_decode([load_stage("mlx", tiny_checkpoint("qwen3"), (0, 4))], prompt, 1)[1]
    assert np.abs(quantized_logits - float_logits).max() > 0.1


def test_torch_split_stages_equal_the_whole_on_a_quantized_checkpoint(quantized):
    path = quantized["qwen3-q8-g64"]  # tied: the last stage dequantizes the embedding as its lm_head
    stages = [
        load_stage("torch", path, layer_range, device="cpu") for layer_range in [(0, 1), (1, 3), (3, 4)]
    ]
    whole = load_stage("torch", path, (0, 4), device="cpu")
    prompt = make_prompt(whole.config.vocab_size, 7, seed=4)
    tokens, logits = greedy_decode(stages, prompt, 6)
    expected_tokens, expected_logits = greedy_decode([whole], prompt, 6)
    np.testing.assert_allclose(logits, expected_logits, atol=1e-5, rtol=0)
    assert tokens == expected_tokens
    assert stages[1].model.embed_tokens is None and stages[1].model.lm_head is None


def test_both_engines_keep_4_bit_weights_packed(quantized, tiny_checkpoint):
    path = quantized["llama-q4-g64"]
    middle = load_stage("mlx", path, (1, 3))
    projection = middle.model.model.layers[1].mlp.gate_proj
    assert isinstance(projection, nn.QuantizedLinear)
    assert projection.weight.dtype == mx.uint32 and (projection.bits, projection.group_size) == (4, 64)
    torch_middle = load_stage("torch", path, (1, 3), device="cpu")
    # Both hold 4 bits plus a float32 scale and bias (zero point) per 64 weights: 5 bits against 32.
    dense = load_stage("torch", tiny_checkpoint("llama"), (1, 3), device="cpu")
    assert torch_middle.weight_bytes() < dense.weight_bytes() / 5
    assert abs(torch_middle.weight_bytes() - middle.weight_bytes()) < 0.05 * middle.weight_bytes()
    gate_up = torch_middle.model.layers["1"].mlp.gate_up.linear
    assert isinstance(gate_up, QuantizedLinear) and (gate_up.mode, gate_up.group_size) == ("int4", 64)


def test_per_layer_settings_are_followed(quantized):
    config = json.loads((quantized[MIXED] / "config.json").read_text())["quantization"]
    assert config["model.layers.0.mlp.down_proj"]["bits"] == 8 and config["bits"] == 4
    layer = load_stage("mlx", quantized[MIXED], (0, 1)).model.model.layers[0]
    assert (layer.mlp.down_proj.bits, layer.mlp.down_proj.group_size) == (8, 64)
    assert (layer.mlp.up_proj.bits, layer.mlp.up_proj.group_size) == (4, 32)


def test_torch_stage_dequantizes_to_its_dtype(quantized):
    stage = load_stage("torch", quantized["llama-q4-g64"], (0, 2), dtype="bfloat16", device="cpu")
    assert {p.dtype for p in stage.model.parameters()} == {torch.bfloat16}


def test_only_affine_quantization_is_supported(quantized, tmp_path):
    folder = tmp_path / "mxfp4"
    folder.mkdir()
    for file in quantized["llama-q4-g64"].iterdir():
        (folder / file.name).symlink_to(file)
    config = json.loads((quantized["llama-q4-g64"] / "config.json").read_text())
    config["quantization"]["mode"] = "mxfp4"
    (folder / "config.json").unlink()
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="quantization mode 'mxfp4' is not supported"):
        load_stage("torch", folder, (0, 4), device="cpu")
