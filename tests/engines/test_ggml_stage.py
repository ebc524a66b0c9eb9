"""A ggml stage: equality with the torch engine, splits, mixed steps, quantized weights, its own tensors only,
and clear errors for bad steps."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ggml")

from meshllm.engines import load_stage  # noqa: E402
from meshllm.engines.ggml import GgmlStage  # noqa: E402
from meshllm.errors import ConfigError, StageError  # noqa: E402
from meshllm.models.tiny import ARCHS  # noqa: E402
from meshllm.step import Segment, StepInput  # noqa: E402
from tests.engines.stage_helpers import greedy_decode, make_prompt, pipeline_logits  # noqa: E402

N_TOKENS = 12  # greedy tokens compared per checkpoint
# float32 ggml against float32 torch: the same arithmetic in another order (logits are of order 10).
F32_ATOL = 1e-4
# float16 weights against float32 torch: measured up to 0.03 on the tiny checkpoints.
F16_ATOL = 0.1


@pytest.fixture(scope="module")
def checkpoints(tiny_checkpoint: Callable[..., Path]) -> dict[str, Path]:
    return {arch: tiny_checkpoint(arch) for arch in ARCHS}


@pytest.fixture(scope="module")
def torch_greedy(checkpoints: dict[str, Path]) -> dict[str, tuple[np.ndarray, list[int], np.ndarray]]:
    """Per architecture: the prompt, torch's greedy tokens and their logits (float32, one stage)."""
    results = {}
    for arch, path in checkpoints.items():
        stage = load_stage("torch", path, (0, 4))
        prompt = make_prompt(stage.config.vocab_size, 9)
        tokens, logits = greedy_decode([stage], prompt, N_TOKENS)
        results[arch] = (prompt, tokens, logits)
    return results


@pytest.mark.parametrize("dtype,atol", [("float32", F32_ATOL), ("float16", F16_ATOL)])
@pytest.mark.parametrize("arch", ARCHS)
def test_logits_and_greedy_tokens_equal_torch(arch, dtype, atol, checkpoints, torch_greedy):
    stage = load_stage("ggml", checkpoints[arch], (0, 4), dtype=dtype)
    assert isinstance(stage, GgmlStage) and stage.engine == "ggml"
    prompt, expected_tokens, expected_logits = torch_greedy[arch]
    tokens, logits = greedy_decode([stage], prompt, N_TOKENS)
    np.testing.assert_allclose(logits, expected_logits, atol=atol, rtol=0)
    assert tokens == expected_tokens


@pytest.mark.parametrize(
    "layer_ranges", [[(0, 2), (2, 4)], [(0, 1), (1, 3), (3, 4)]], ids=["2 stages", "3 stages"]
)
@pytest.mark.parametrize("arch", ARCHS)
def test_split_stages_equal_the_whole(arch, layer_ranges, checkpoints, torch_greedy):
    stages = [load_stage("ggml", checkpoints[arch], layer_range) for layer_range in layer_ranges]
    prompt, expected_tokens, expected_logits = torch_greedy[arch]
    tokens, logits = greedy_decode(stages, prompt, N_TOKENS)
    np.testing.assert_allclose(logits, expected_logits, atol=F32_ATOL, rtol=0)
    assert tokens == expected_tokens


def test_torch_ggml_mlx_stages_in_one_pipeline(checkpoints, torch_greedy):
    """Hidden states pass from a torch stage to a ggml stage to an MLX stage and give torch's tokens."""
    pytest.importorskip("mlx.core")
    path = checkpoints["qwen3"]
    stages = [
        load_stage("torch", path, (0, 1)),
        load_stage("ggml", path, (1, 3)),
        load_stage("mlx", path, (3, 4)),
    ]
    prompt, expected_tokens, expected_logits = torch_greedy["qwen3"]
    tokens, logits = greedy_decode(stages, prompt, N_TOKENS)
    np.testing.assert_allclose(logits, expected_logits, atol=F32_ATOL, rtol=0)
    assert tokens == expected_tokens


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_a_step_of_several_sequences_equals_each_alone(arch, checkpoints):
    """Prefill of one sequence and decode of another in one step: each row as when run by itself."""
    stage = load_stage("ggml", checkpoints[arch], (0, 4))
    vocab = stage.config.vocab_size
    first, second = make_prompt(vocab, 6, seed=2), make_prompt(vocab, 11, seed=3)
    alone = [
        pipeline_logits([stage], [Segment(1, 0, len(first), sample=True)], first)[0],
        pipeline_logits([stage], [Segment(2, 0, len(second) - 1, sample=True)], second[:-1])[0],
    ]
    decode_alone = pipeline_logits([stage], [Segment(2, len(second) - 1, 1, sample=True)], second[-1:])[0]
    stage.release([1, 2])
    # sequence 2's prompt less its last token first, then one step: sequence 1's prefill and 2's decode
    pipeline_logits([stage], [Segment(2, 0, len(second) - 1, sample=True)], second[:-1])
    segments = [Segment(1, 0, len(first), sample=True), Segment(2, len(second) - 1, 1, sample=True)]
    together = pipeline_logits([stage], segments, np.concatenate([first, second[-1:]]))
    np.testing.assert_allclose(together[0], alone[0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(together[1], decode_alone, atol=1e-5, rtol=0)
    assert stage.live_sequences() == 2
    config = stage.config
    assert stage.kv_bytes_per_token() == 4 * 2 * 4 * config.num_key_value_heads * config.head_dim
    stage.release([1, 2, 99])
    assert stage.live_sequences() == 0


@pytest.mark.parametrize("quantize,min_correlation", [("int8", 0.999), ("int4", 0.95)])
def test_quantized_weights_follow_float32(quantize, min_correlation, checkpoints, torch_greedy):
    """q8_0 / q4_0 weights: the prompt's logits track float32's closely, and the weights take less room."""
    path = checkpoints["qwen3"]
    prompt, expected_tokens, expected_logits = torch_greedy["qwen3"]
    full = load_stage("ggml", path, (0, 4))
    stage = load_stage("ggml", path, (0, 4), quantize=quantize)
    logits = pipeline_logits([stage], [Segment(0, 0, len(prompt), sample=True)], prompt)[0]
    assert np.corrcoef(logits, expected_logits[0])[0, 1] > min_correlation
    assert int(logits.argmax()) == expected_tokens[0]
    assert stage.weight_bytes() < full.weight_bytes() / (3 if quantize == "int8" else 5)
    import ggml

    if quantize == "int4" and ggml.ggml_cpu_has_avx2():
        # q4_0 matrices in ggml's repacked (interleaved) layout, as llama.cpp holds them on such CPUs
        assert stage.weights.placement.get("CPU_REPACK", 0) > 0


def test_a_stage_holds_only_its_layers(checkpoints):
    stage = load_stage("ggml", checkpoints["llama"], (1, 3))
    names = set(stage.weights.tensors)
    assert names and all(name.startswith(("layers.1.", "layers.2.")) for name in names)
    assert {name.split(".")[1] for name in names} == {"1", "2"}
    last = load_stage("ggml", checkpoints["llama"], (3, 4))
    assert {"norm.weight", "lm_head.weight"} <= set(last.weights.tensors)
    assert "embed_tokens.weight" not in last.weights.tensors


def test_bad_steps_are_clear_errors_and_the_stage_goes_on(checkpoints):
    path = checkpoints["qwen2"]
    first, second = load_stage("ggml", path, (0, 2)), load_stage("ggml", path, (2, 4))
    hidden = first.config.hidden_size
    with pytest.raises(StageError, match="position 5"):
        first.forward(StepInput(0, [Segment(7, 5, 1)], token_ids=np.array([3])))
    with pytest.raises(StageError, match="outside the vocabulary"):
        first.forward(StepInput(0, [Segment(7, 0, 1)], token_ids=np.array([first.config.vocab_size])))
    with pytest.raises(StageError, match="2 inputs for 3 tokens"):
        first.forward(StepInput(0, [Segment(7, 0, 3)], token_ids=np.array([3, 4])))
    with pytest.raises(StageError, match="shape"):
        second.forward(StepInput(0, [Segment(7, 0, 2)], hidden_states=np.zeros((2, hidden + 1), np.float32)))
    with pytest.raises(StageError, match="needs hidden states"):
        second.forward(StepInput(0, [Segment(7, 0, 2)]))
    with pytest.raises(ConfigError, match="dtype"):
        load_stage("ggml", path, (0, 2), dtype="float64")
    prompt = make_prompt(first.config.vocab_size, 5)
    logits = pipeline_logits([first, second], [Segment(8, 0, 5, sample=True)], prompt)
    assert logits.shape == (1, first.config.vocab_size) and np.isfinite(logits).all()


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_calibrate_measures_read_speed_and_compute_rate(quantize):
    from meshllm.devices import Precision
    from meshllm.engines import calibrate

    measured = calibrate("ggml", Precision("float32", quantize))
    assert measured.read_bandwidth > 1e8 and measured.flop_rate > 1e8  # well above nothing, finite
    assert np.isfinite([measured.read_bandwidth, measured.flop_rate]).all()
    with pytest.raises(ConfigError, match="CPU"):
        calibrate("ggml", Precision("float32"), device="cuda")


def test_int4_holds_rows_of_whole_256s_in_q4_k_and_shorter_ones_in_q4_0(tmp_path):
    import ggml

    from meshllm.models.tiny import TinySpec, make_checkpoint

    spec = TinySpec(
        hidden_size=256, intermediate_size=512, num_attention_heads=4, head_dim=64, num_hidden_layers=2
    )
    path = make_checkpoint(tmp_path / "wide", arch="qwen3", spec=spec)
    full = load_stage("ggml", path, (0, 2))
    stage = load_stage("ggml", path, (0, 2), quantize="int4")
    kinds = {name: tensor.contents.type for name, tensor in stage.weights.tensors.items()}
    assert kinds["layers.0.mlp.gate_up_proj.weight"] == ggml.GGML_TYPE_Q4_K  # rows of 256
    assert kinds["layers.0.mlp.down_proj.weight"] == ggml.GGML_TYPE_Q4_K  # rows of 512
    assert kinds["layers.0.self_attn.qkv_proj.weight"] == ggml.GGML_TYPE_Q4_K
    assert kinds["layers.0.input_layernorm.weight"] == ggml.GGML_TYPE_F32
    prompt = make_prompt(full.config.vocab_size, 9)
    segment = [Segment(0, 0, len(prompt), sample=True)]
    expected = pipeline_logits([full], segment, prompt)[0]
    logits = pipeline_logits([stage], segment, prompt)[0]
    assert np.corrcoef(logits, expected)[0, 1] > 0.95
    assert stage.weight_bytes() < full.weight_bytes() / 5
    int8 = load_stage("ggml", path, (0, 2), quantize="int8")
    assert {tensor.contents.type for tensor in int8.weights.tensors.values()} == {
        ggml.GGML_TYPE_Q8_0,
        ggml.GGML_TYPE_F32,
    }
